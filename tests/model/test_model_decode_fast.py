"""generate(decode="fast") (FastDecode: fused projections, folded RoPE, no op switch) returns the same tokens as
the reference forward (decode="plain"): greedy and seeded sampling, batches, GQA and MHA, tied embeddings, a
padded batch (which falls back to the forward), and after the weights change in place (the fused copies are
rebuilt)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import small_config

from z2all.model.generate import FastDecode, generate
from z2all.model.llama import Z2all
from z2all.utils import UserError


def model(**kw) -> Z2all:
    torch.manual_seed(0)
    return Z2all(small_config(init_std=0.3, max_seq_len=96, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 6}, {"tie_embeddings": True}])
def test_fast_equals_plain(kw):
    m = model(**kw)
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]]
    for batch in (prompts[:1], prompts):
        assert generate(m, batch, 40, decode="fast") == generate(m, batch, 40, decode="plain")
    g = [torch.Generator().manual_seed(5) for _ in range(2)]
    a = generate(m, prompts, 30, temperature=0.9, top_p=0.9, generator=g[0], decode="fast")
    b = generate(m, prompts, 30, temperature=0.9, top_p=0.9, generator=g[1], decode="plain")
    assert a == b
    # the step's logits match the forward's closely
    fd = FastDecode(m)
    cache = m.new_kv_cache(1, 16)
    ref_cache = m.new_kv_cache(1, 16)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        m(idx, kv_cache=cache, start_pos=0)
        m(idx, kv_cache=ref_cache, start_pos=0)
        got = fd.step(torch.tensor([7]), 4, cache)
        want, _ = m(torch.tensor([[7]]), kv_cache=ref_cache, start_pos=4)
    torch.testing.assert_close(got, want[:, -1], rtol=1e-5, atol=1e-5)


def test_fast_padded_batch_and_weight_changes():
    m = model()
    prompts = [[3, 14, 15], [35, 89, 79, 32, 38, 4]]
    assert generate(m, prompts, 20, decode="fast") == generate(m, prompts, 20, decode="plain")
    before = generate(m, prompts[:1], 20, decode="fast")
    with torch.no_grad():
        m.layers[0].attention.wq.weight.mul_(-1.5)  # in place: same storage, new version
        m.layers[1].feed_forward.w1.weight.add_(0.2)
    after = generate(m, prompts[:1], 20, decode="fast")
    assert after == generate(m, prompts[:1], 20, decode="plain") and after != before
    with pytest.raises(UserError, match="--decode"):
        generate(m, prompts, 2, decode="quick")


def test_lora_model_takes_the_forward():
    """A LoRA-wrapped model (adapters not merged) is not FastDecode's: generate falls back to the forward,
    which runs the adapters."""
    from z2all.model.lora import LoraConfig, apply_lora

    m = model()
    apply_lora(m, LoraConfig(rank=4))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    assert FastDecode.for_model(m) is None
    assert generate(m, [[3, 14, 15]], 12, decode="fast") == generate(m, [[3, 14, 15]], 12, decode="plain")
