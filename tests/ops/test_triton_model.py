"""The whole model with every Triton kernel on (`preset=use_all`, with either attention backward) equals the
reference model (`preset=naive`): the loss and the gradient of every parameter, fp32, tiny config (GQA, head
dim 16, odd FFN width, a sequence that is not a multiple of the kernels' block, ignored targets); on CPU
through the interpreter, on a CUDA machine the compiled kernels. Also: the switch selects our kernels (op
keys and `Ops` fields share one name), and a Triton op on CPU tensors without the interpreter fails with a
message that says what to do.

Tolerance: atol = rtol = 1e-4 on the loss and on every gradient (fp32; two layers of reordered sums).
"""

from __future__ import annotations

import copy

import pytest
import torch
from ops_helpers import DEV

from z2all.model.config import ModelConfig
from z2all.model.llama import Z2all
from z2all.ops import OPS, OpsConfig, resolve
from z2all.utils import UserError

pytest.importorskip("triton")


def test_use_all_resolves_to_triton_kernels():
    ops = resolve(OpsConfig(preset="use_all"))
    for op in OPS:  # the config key is the field name
        assert getattr(ops, op).__module__.startswith("z2all.ops.triton."), op
    assert ops.attention.__name__ == "attention" and ("attention_bwd", "split") in ops.names
    ops = resolve(OpsConfig(preset="use_all", rope="torch"))  # the "w/o RoPE" ablation row
    assert ops.rope.__module__ == "z2all.ops.reference"
    assert ops.attention.__module__ == "z2all.ops.triton.attention"


def test_attention_bwd_switch():
    ops = resolve(OpsConfig(preset="use_all", attention_bwd="atomic"))
    assert ops.attention.__name__ == "attention_atomic_dq" and ("attention_bwd", "atomic") in ops.names
    assert "attention_bwd" not in dict(resolve(OpsConfig(attention="sdpa")).names)
    with pytest.raises(UserError, match="attention_bwd=atomic applies to the Triton attention only"):
        resolve(OpsConfig(attention="sdpa", attention_bwd="atomic"))
    with pytest.raises(UserError, match="unknown backward 'fast'"):
        resolve(OpsConfig(preset="use_all", attention_bwd="fast"))


def test_liger_without_the_package_is_a_config_error():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("Liger-Kernel is installed")
    with pytest.raises(UserError, match="Liger-Kernel is not installed"):
        resolve(OpsConfig(rmsnorm="liger"))


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    import z2all.ops.triton as T
    from z2all.ops.triton.swiglu import swiglu

    monkeypatch.setattr(T, "INTERPRET", False)
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        swiglu(x, x)


def test_old_triton_interpreter_is_a_clear_error(monkeypatch):
    import z2all.ops.triton as T
    from z2all.ops.triton.swiglu import swiglu

    monkeypatch.setattr(T, "INTERPRET", True)
    monkeypatch.setattr(T.triton, "__version__", "3.6.0")
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"triton>=3\.7"):
        swiglu(x, x)
    assert T._version("3.10.1+git") == (3, 10) and T._version("3.7rc1") == T.MIN_INTERPRETER_VERSION


@pytest.mark.parametrize("bwd", ["split", "atomic"])
def test_model_with_all_kernels_matches_reference(bwd):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=90, max_seq_len=32)
    torch.manual_seed(0)
    ref = Z2all(cfg, OpsConfig(preset="naive"))
    ours = copy.deepcopy(ref)
    ours.set_ops(OpsConfig(preset="use_all", attention_bwd=bwd))
    dev = DEV
    ref, ours = ref.to(dev), ours.to(dev)

    idx = torch.randint(0, cfg.vocab_size, (2, 19), device=dev)
    targets = torch.randint(0, cfg.vocab_size, (2, 19), device=dev)
    targets[0, :3] = -100
    _, loss_ref = ref(idx, targets)
    _, loss_ours = ours(idx, targets)
    loss_ref.backward()
    loss_ours.backward()
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-4, rtol=1e-4)
    ref_params = dict(ref.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        r = ref_params[name]
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, r.grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        n += 1
    assert n == 2 + 9 * cfg.n_layers + 1  # embeddings, output, 9 per block, final norm


def test_kv_cache_decoding_with_triton_attention_matches_sdpa():
    """Prefill then token-by-token decoding through the KV cache (T < S, bottom-right causal): the Triton
    attention gives the same logits as SDPA at every step."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, ffn_dim=48, max_seq_len=16)
    torch.manual_seed(0)
    model = Z2all(cfg, OpsConfig(attention="sdpa")).to(DEV)
    idx = torch.randint(0, cfg.vocab_size, (1, 8), device=DEV)
    logits = {}
    for impl in ("sdpa", "triton"):
        model.set_ops(OpsConfig(attention=impl))
        cache = model.new_kv_cache(1, 8)
        with torch.no_grad():
            steps = [model(idx[:, :5], kv_cache=cache, start_pos=0)[0]]
            for pos in range(5, 8):
                steps.append(model(idx[:, pos:pos + 1], kv_cache=cache, start_pos=pos)[0])
        logits[impl] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["triton"], logits["sdpa"], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", ["split", "atomic"])
def test_model_with_all_kernels_bf16_autocast_gpu(bwd):
    """What training runs: bf16 autocast, fp32 weights, head dim 64, GQA, a sequence of odd length. bf16 rounds
    differently in every kernel, so: the loss within 2%, every gradient pointing the same way (cosine > 0.99)
    and of the same size (norm within 5%) as the reference model's under the same autocast."""
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, ffn_dim=688, max_seq_len=512)
    torch.manual_seed(0)
    ref = Z2all(cfg, OpsConfig(preset="naive")).cuda()
    ours = copy.deepcopy(ref)
    ours.set_ops(OpsConfig(preset="use_all", attention_bwd=bwd))
    idx = torch.randint(0, cfg.vocab_size, (2, 333), device="cuda")
    targets = torch.randint(0, cfg.vocab_size, (2, 333), device="cuda")
    losses = []
    for model in (ref, ours):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, r = p.grad.float().flatten(), ref_params[name].grad.float().flatten()
        cos = torch.nn.functional.cosine_similarity(g, r, dim=0).item()
        assert cos > 0.99, f"{name}: cosine {cos:.4f}"
        assert g.norm().item() == pytest.approx(r.norm().item(), rel=5e-2), name
