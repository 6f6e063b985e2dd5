"""LoRA adapters (z2all/model/lora.py): only the adapters train and the adapted model starts equal to the base;
merging equals the adapted model; an adapter-only checkpoint loads (merged) through load_model and is refused
when its base changed; `z2all export hf --merge-lora` gives a plain Llama directory and `--adapter` a PEFT
adapter that `peft` loads onto the exported base, both equal to our logits (fp32, atol 1e-5); the Triton op
switch works under LoRA; adapters_disabled() is the base."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import small_config

from z2all.model.llama import Z2all, load_model, save_model
from z2all.model.lora import (
    LoraConfig,
    LoraLinear,
    adapters_disabled,
    apply_lora,
    lora_state_dict,
    merge_lora,
    target_names,
    trainable_params,
)
from z2all.utils import UserError


def _model(seed: int = 0) -> Z2all:
    torch.manual_seed(seed)
    return Z2all(small_config())


def _perturb(model) -> None:
    """Non-zero B so the adapters change the output (B starts at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_targets_by_short_hf_and_our_names():
    assert target_names("q,v") == ("q", "v")
    assert target_names("q_proj,gate_proj,w2") == ("q", "gate", "down")
    assert target_names("attn") == ("q", "k", "v", "o") and len(target_names("all")) == 7
    with pytest.raises(UserError, match="unknown layer 'qq'"):
        target_names("qq")


def test_only_adapters_train_and_start_equal_to_the_base():
    torch.set_num_threads(1)
    base, model = _model(), apply_lora(_model(), LoraConfig(rank=4, alpha=8, targets="all"))
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model(x)[0], base(x)[0], atol=0, rtol=0)
    cfg = small_config()
    per_layer = sum(4 * (i + o) for i, o in [(cfg.dim, cfg.dim), (cfg.dim, 16), (cfg.dim, 16), (cfg.dim, cfg.dim),
                                             (cfg.dim, cfg.ffn_hidden), (cfg.ffn_hidden, cfg.dim),
                                             (cfg.dim, cfg.ffn_hidden)])
    assert trainable_params(model) == per_layer * cfg.n_layers
    assert all(k.endswith(("lora_A", "lora_B")) for k in lora_state_dict(model))
    # base keys are unchanged: a base state dict still loads (non-strict only for the adapters)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    _, loss = model(x, x)
    loss.backward()
    assert all((p.grad is None) == (not p.requires_grad) for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    w0 = model.layers[0].attention.wq.weight.clone()
    opt.step()
    assert torch.equal(model.layers[0].attention.wq.weight, w0)


def test_merge_equals_adapted_and_disabled_equals_base():
    torch.set_num_threads(1)
    base = _model()
    model = apply_lora(_model(), LoraConfig(rank=4, alpha=8, targets="q,k,v,o,gate,up,down"))
    _perturb(model)
    x = torch.randint(0, 97, (2, 12))
    adapted = model(x)[0]
    assert not torch.allclose(adapted, base(x)[0], atol=1e-4)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x)[0], base(x)[0], atol=0, rtol=0)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=0)


def test_triton_ops_under_lora():
    pytest.importorskip("triton")
    from z2all.ops import OpsConfig

    torch.set_num_threads(1)
    model = apply_lora(_model(), LoraConfig(rank=2, targets="q,v,down"))
    _perturb(model)
    x = torch.randint(0, 97, (1, 8))
    ref_loss = model(x, x)[1]
    model.set_ops(OpsConfig(rmsnorm="triton", rope="triton", swiglu="triton", cross_entropy="triton"))
    loss = model(x, x)[1]
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    assert model.layers[1].feed_forward.w2.lora_B.grad is not None


def _adapter_checkpoint(tmp_path):
    """A base checkpoint and an adapter-only checkpoint on it, written through the objective hooks."""
    from z2all.model.lora import LoraHooks

    save_model(_model(), tmp_path / "base")
    hooks = LoraHooks()
    hooks.lora, hooks.init_path = LoraConfig(rank=4, alpha=8, targets="q,v,gate"), tmp_path / "base"
    model = hooks.wrap_lora(load_model(tmp_path / "base"))
    _perturb(model)
    ck = tmp_path / "ck"
    save_model(model, ck, state_dict=hooks.checkpoint_weights(model))
    (ck / "state.json").write_text(json.dumps({"step": 1, **hooks.lora_state()}))
    return model, ck


def test_adapter_checkpoint_is_small_loads_merged_and_checks_its_base(tmp_path):
    torch.set_num_threads(1)
    model, ck = _adapter_checkpoint(tmp_path)
    assert (ck / "model.safetensors").stat().st_size < (tmp_path / "base" / "model.safetensors").stat().st_size / 4
    x = torch.randint(0, 97, (2, 10))
    loaded = load_model(ck)
    assert not any(isinstance(m, LoraLinear) for m in loaded.modules())
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=1e-5, rtol=0)
    # resume path: adapters back onto a wrapped base
    from z2all.model.lora import LoraHooks

    hooks = LoraHooks()
    hooks.lora, hooks.init_path = LoraConfig(rank=4, alpha=8, targets="q,v,gate"), tmp_path / "base"
    again = hooks.wrap_lora(load_model(tmp_path / "base"))
    hooks.load_weights(again, ck)
    torch.testing.assert_close(again(x)[0], model(x)[0], atol=0, rtol=0)
    save_model(_model(seed=5), tmp_path / "base")  # the base changes under the adapters
    with pytest.raises(UserError, match="has changed"):
        load_model(ck)


def test_export_merge_lora_and_peft_adapter_match_our_logits(tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from transformers import LlamaForCausalLM

    from z2all.model.hf_compat import export_hf
    from z2all.model.lora import export_peft_adapter

    torch.set_num_threads(1)
    model, ck = _adapter_checkpoint(tmp_path)
    x = torch.randint(0, 97, (2, 10))
    ours = model(x)[0]
    merged_dir = export_hf(ck, tmp_path / "merged")
    hf = LlamaForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
    assert not any("lora" in k for k in hf.state_dict())
    torch.testing.assert_close(hf(x).logits, ours, atol=1e-5, rtol=0)

    from z2all.model import hf_compat

    assert hf_compat.run(hf_compat.Config(ckpt=str(ck), out=str(tmp_path / "adapter"), adapter=True,
                                          base_out=str(tmp_path / "base-hf"))) == 0
    base_dir, adapter_dir = tmp_path / "base-hf", tmp_path / "adapter"
    with pytest.raises(UserError, match="--merge-lora"):
        hf_compat.run(hf_compat.Config(ckpt=str(ck), out=str(tmp_path / "x"), merge_lora=False))
    with pytest.raises(UserError, match="not a LoRA checkpoint"):
        export_peft_adapter(tmp_path / "base", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    mine = tmp_path / "mine"  # --base-out on someone's directory: the message names --base-out, not --out,
    mine.mkdir()              # and the adapter's --out is left as it was (not created)
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="^--base-out .*mine is not empty"):
        hf_compat.run(hf_compat.Config(ckpt=str(ck), out=str(tmp_path / "z"), adapter=True, base_out=str(mine)))
    assert not (tmp_path / "z").exists() and [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="separate directories"):  # was: a base export written, then refused
        hf_compat.run(hf_compat.Config(ckpt=str(ck), out=str(tmp_path / "ad"), adapter=True,
                                       base_out=str(tmp_path / "ad" / "base")))
    assert not (tmp_path / "ad").exists()
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and sorted(conf["target_modules"]) == [
        "gate_proj", "q_proj", "v_proj"]
    base_hf = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    wrapped = peft.PeftModel.from_pretrained(base_hf, str(adapter_dir)).eval()
    torch.testing.assert_close(wrapped(x).logits, ours, atol=1e-5, rtol=0)


def test_bad_options_are_one_line_errors():
    for kw, pat in [({"rank": -1}, "rank=-1"), ({"rank": 4, "alpha": 0}, "alpha=0"),
                    ({"rank": 4, "dropout": 1.0}, "dropout=1.0"), ({"rank": 4, "targets": ""}, "empty")]:
        with pytest.raises(UserError, match=pat):
            LoraConfig(**kw).validate()
