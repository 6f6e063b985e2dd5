"""generate(decode="fast") (FastDecode: fused transposed projections, residual adds in addmm, folded RoPE, no op
switch) returns the same tokens as the reference forward (decode="plain"): greedy and seeded sampling, batches,
GQA and MHA, tied embeddings, a padded batch (which falls back to the forward), and after the weights change
in place (the fused copies are rebuilt). FastDecode.step_rows (the serving engine's batched step, each row at
its own position in its own slot) gives each row the logits step() gives it alone. The decode-thread rule:
a small CPU model decodes on one thread, an explicit count is obeyed, torch's count is restored after, and
the tokens do not depend on it."""

from __future__ import annotations

import os

import pytest
import torch
from model_helpers import small_config

from z2all.model.generate import FastDecode, Panels, _decodec, generate, num_threads, onednn_linear_ok
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


def test_step_rows_equals_step_per_row():
    """Three slots at different positions, one batched step_rows (a gather, then a slice of consecutive
    slots) == each row's own step() on a one-row cache."""
    m = model()
    c = m.cfg
    prompts = [[3, 14, 15], [35, 89, 79, 32, 38, 4, 7], [2, 71, 82, 81, 8]]
    L = 16
    k_pool = [torch.zeros(4, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    v_pool = [torch.zeros(4, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    fd = FastDecode.for_model(m)
    want = []
    with torch.inference_mode():
        for slot, p in zip((0, 1, 2), prompts):
            cache = m.new_kv_cache(1, L)
            m(torch.tensor([p]), kv_cache=cache)
            for i in range(c.n_layers):
                k_pool[i][slot], v_pool[i][slot] = cache.k[i][0], cache.v[i][0]
            want.append(fd.step(torch.tensor([9 + slot]), len(p), cache)[0])
        for rows, rng in (([2, 0, 1], None), ([0, 1, 2], (0, 3))):
            kp, vp = [k.clone() for k in k_pool], [v.clone() for v in v_pool]
            pos = torch.tensor([len(prompts[r]) for r in rows])
            S = int(pos.max()) + 1
            mask = torch.arange(S)[None, :] <= pos[:, None]
            got = fd.step_rows(torch.tensor([9 + r for r in rows]), pos, kp, vp, torch.tensor(rows), rng, mask)
            for b, r in enumerate(rows):
                torch.testing.assert_close(got[b], want[r], rtol=1e-5, atol=1e-5)
                # the new key landed at the row's own position of its own slot
                assert kp[0][r, :, len(prompts[r])].abs().sum() > 0
                assert kp[0][r, :, len(prompts[r]) + 1:].abs().sum() == 0


def test_decode_threads_rule_and_restore():
    from z2all.model.generate import Config, decode_threads, run

    with pytest.raises(UserError, match="--decode-threads"):
        run(Config(prompt="x", decode_threads=-1))
    m = model()
    assert decode_threads(m) == 1  # a few KB of weights: one thread
    assert decode_threads(m, 3) == 3
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one = generate(m, [[3, 14, 15, 92]], 24, decode="fast")
        assert torch.get_num_threads() == 2  # restored after the decode loop
        assert generate(m, [[3, 14, 15, 92]], 24, decode="fast", threads=2) == one
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


needs_c = pytest.mark.skipif(_decodec is None and not os.environ.get("Z2ALL_REQUIRE_C"),
                             reason="z2all.model._decodec is not built (pip install -e . builds it with a C compiler)")
needs_onednn = pytest.mark.skipif(not onednn_linear_ok(), reason="torch's oneDNN linear ops need an x86 CPU build")
# (batched_matmul, kernels): torch's libraries, and the C kernels (matmuls included, on one thread)
BACKENDS = [pytest.param(("blas", "torch"), id="blas"),
            pytest.param(("onednn", "torch"), id="onednn", marks=needs_onednn),
            pytest.param(("auto", "c"), id="c", marks=needs_c)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_equals_the_forward(backend):
    """FastDecode.prefill (generate()'s and the engine's prompt fill where oneDNN packs the weights or the C
    kernels run) gives the forward's last logits and writes the same keys/values: a whole prompt, a second
    chunk at start > 0 (its causal mask offset by start), and two rows."""
    m = model()
    fd = FastDecode(m, *backend)
    with torch.inference_mode(), num_threads(1):
        for B, T, start in ((1, 9, 0), (1, 6, 7), (2, 11, 0), (2, 1, 4)):
            torch.manual_seed(T)
            pre, idx = torch.randint(0, 97, (B, start)), torch.randint(0, 97, (B, T))
            ref, got = m.new_kv_cache(B, 32), m.new_kv_cache(B, 32)
            if start:
                m(pre, kv_cache=ref, start_pos=0)
                m(pre, kv_cache=got, start_pos=0)
            want, _ = m(idx, kv_cache=ref, start_pos=start, logits_to_keep=1)
            torch.testing.assert_close(fd.prefill(idx, start, got), want[:, -1], rtol=1e-5, atol=1e-5)
            for a, b in zip(ref.k + ref.v, got.k + got.v):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                assert b[:, :, start + T:].abs().sum() == 0  # nothing written past the prompt


@pytest.mark.skipif(not onednn_linear_ok(), reason="torch's oneDNN linear ops need an x86 CPU build")
def test_batched_matmul_onednn_equals_blas():
    """The switch: batched rows through oneDNN's packed weights == through torch.mm (MKL), in logits
    (step_rows) and in greedy tokens (generate() of three equal-length prompts, both == the forward); a
    row's matmul bits do not depend on how many rows share the oneDNN call; a bad value is one clear error."""
    m = model()
    c = m.cfg
    one, blas = FastDecode(m, "onednn", "torch"), FastDecode(m, "blas", "torch")
    assert FastDecode(m).batched_matmul == "onednn"  # auto on an x86 CPU in fp32
    L = 16
    torch.manual_seed(1)
    kp = [torch.randn(4, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    vp = [torch.randn(4, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    with torch.inference_mode():
        def run(fd, rows, pos):
            pos = torch.tensor(pos)
            mask = torch.arange(12)[None, :] <= pos[:, None]
            return fd.step_rows(torch.tensor([5 + r for r in rows]), pos, [k.clone() for k in kp],
                                [v.clone() for v in vp], torch.tensor(rows), None, mask)
        a, b = run(one, [0, 1, 2], [11, 6, 9]), run(blas, [0, 1, 2], [11, 6, 9])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # a row's matmul bits do not depend on the row count (MKL's can, from 4 rows on)
        layers, mm, *_ = one._ops(2)
        x = torch.randn(5, c.dim)
        for w in layers[0][1:3]:
            assert torch.equal(mm(x[:2].contiguous(), w), mm(x, w)[:2])
    prompts = [[3, 14, 15, 92], [35, 89, 79, 32], [2, 71, 82, 81]]
    ref = generate(m, prompts, 30, decode="plain")
    assert generate(m, prompts, 30, decode="fast", batched_matmul="onednn", kernels="torch") == ref
    assert generate(m, prompts, 30, decode="fast", batched_matmul="blas", kernels="torch") == ref
    with pytest.raises(UserError, match="--batched-matmul"):
        FastDecode(m, "mkl")


@pytest.mark.skipif(not onednn_linear_ok(), reason="torch's oneDNN linear ops need an x86 CPU build")
def test_auto_skips_the_packed_copy_when_memory_is_short(monkeypatch):
    """auto takes oneDNN's packed copy of the weights only where it leaves half of the free memory; an
    explicit onednn is the user's choice."""
    from z2all.model import generate as g

    m = model()
    weights = sum(p.numel() * 4 for p in m.parameters())
    monkeypatch.setattr(g, "_available_memory", lambda device: weights)  # less than twice the copy
    assert FastDecode(m).batched_matmul == "blas"
    assert FastDecode(m, "onednn").batched_matmul == "onednn"
    monkeypatch.setattr(g, "_available_memory", lambda device: 100 * weights)
    assert FastDecode(m).batched_matmul == "onednn"


def test_no_fast_decoder_where_its_copy_would_not_fit(monkeypatch, capsys):
    """Every FastDecode path copies the block weights and the LM head on its first step: with less free
    memory than that (/0.8), for_model gives None and generate() decodes through the forward, the same
    tokens, with one note; with room, the fast decoder is back."""
    from z2all.model import generate as g

    m = model()
    copy = (sum(p.numel() for p in m.layers.parameters()) + m.output.weight.numel()) * 4
    monkeypatch.setattr(g, "_available_memory", lambda device: copy)
    assert FastDecode.for_model(m) is None
    prompts = [[3, 14, 15, 92, 65]]
    assert generate(m, prompts, 20, decode="fast") == generate(m, prompts, 20, decode="plain")
    assert generate(m, prompts, 5, decode="fast") == generate(m, prompts, 5, decode="plain")
    assert capsys.readouterr().err.count("does not fit") == 1
    monkeypatch.setattr(g, "_available_memory", lambda device: 2 * copy)
    assert FastDecode.for_model(m) is not None


@needs_c
@pytest.mark.parametrize("dim,heads,kv", [(48, 6, 2), (36, 6, 3), (256, 4, 2), (512, 4, 2)])
def test_c_kernels_equal_torch(dim, heads, kv):
    """The compiled kernels == the torch ops: RMSNorm on 1, 8 and 33 rows; the attention (RoPE, cache write,
    causal attention in one call per layer; its register path for head_dim 64 and 128, the generic loop for
    8 and 6) and the matmuls (on one thread) in step() and step_rows() logits and cache contents;
    generate()'s greedy tokens == the forward's. A position outside the cache is a ValueError before
    anything is written."""
    assert _decodec is not None, "Z2ALL_REQUIRE_C is set but z2all.model._decodec is not built"
    m = model(dim=dim, n_heads=heads, n_kv_heads=kv, ffn_dim=2 * dim)
    c = m.cfg
    fc, ft = FastDecode(m, kernels="c"), FastDecode(m, kernels="torch")
    assert FastDecode(m).kernels == "c"  # auto: fp32 on the CPU with the extension built
    w = m.layers[0].attention_norm.weight.detach() + torch.randn(dim)
    for rows in (1, 8, 33):
        x = torch.randn(rows, dim) * 3
        torch.testing.assert_close(fc._rms(x, w), torch.rms_norm(x, (dim,), w, c.norm_eps), rtol=1e-5, atol=1e-5)
    L = 24
    torch.manual_seed(2)
    kp = [torch.randn(4, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    vp = [torch.randn(4, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    # tolerance relative to each tensor's scale: fp32 rounding (C contracts RoPE's x*c + y*s to one FMA and
    # sums in another order) on keys and logits up to ~20 with these weights
    with torch.inference_mode(), num_threads(1):
        caches = {}
        for name, fd in (("c", fc), ("torch", ft)):
            cache = m.new_kv_cache(2, L)
            m(torch.tensor([[5, 6, 7, 8, 9, 10, 11]] * 2), kv_cache=cache)
            caches[name] = (fd.step(torch.tensor([3, 4]), 7, cache), cache)
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))  # noqa: E731
        close(caches["c"][0], caches["torch"][0])
        for a, b in zip(caches["c"][1].k + caches["c"][1].v, caches["torch"][1].k + caches["torch"][1].v):
            close(a, b)
        rows, pos = torch.tensor([3, 0, 1]), torch.tensor([23, 0, 9])
        mask = torch.arange(24)[None, :] <= pos[:, None]
        got = {}
        for name, fd in (("c", fc), ("torch", ft)):
            k, v = [x.clone() for x in kp], [x.clone() for x in vp]
            got[name] = (fd.step_rows(torch.tensor([1, 2, 3]), pos, k, v, rows, None, mask), k, v)
        close(got["c"][0], got["torch"][0])
        for a, b in zip(got["c"][1] + got["c"][2], got["torch"][1] + got["torch"][2]):
            close(a, b)
        qkv = torch.randn(1, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim)
        before = kp[0].clone()
        with pytest.raises(ValueError, match="outside the cache"):
            fc._attend_c(qkv, kp[0], vp[0], torch.tensor([0]), torch.tensor([L]), 0,
                         fc._rope(torch.device("cpu"), L + 1))
        assert torch.equal(kp[0], before)
    prompts = [[3, 14, 15, 92], [35, 89, 79, 32]]
    assert generate(m, prompts, 30, decode="fast") == generate(m, prompts, 30, decode="plain")
    with pytest.raises(UserError, match="--decode-kernels"):
        FastDecode(m, kernels="asm")


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_prefill_many_chunks_do_not_depend_on_their_company(backend):
    """prefill_many (the engine's prompt chunks of one iteration in one pass): three chunks of different
    lengths, one a second chunk (start 7), give each the same logits and cache bits as that chunk alone,
    and the forward's to fp32 rounding; with oneDNN's packed matmuls and with the C kernels."""
    from z2all.model.generate import CacheRows

    m = model()
    fd = FastDecode(m, *backend)
    torch.manual_seed(4)
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 13, 5)]
    starts = [0, 0, 7]

    def caches():
        out = []
        for st in starts:
            c = m.new_kv_cache(1, 32)
            if st:
                m(torch.randint(0, 97, (1, st), generator=torch.Generator().manual_seed(st)), kv_cache=c)
            out.append(c)
        return out

    with torch.inference_mode(), num_threads(1):
        together_caches = caches()
        together = fd.prefill_many([(p, st, CacheRows(c.k, c.v)) for p, st, c in zip(prompts, starts, together_caches)])
        for j, (p, st) in enumerate(zip(prompts, starts)):
            c = caches()[j]
            alone = fd.prefill_many([(p, st, CacheRows(c.k, c.v))])
            assert torch.equal(alone[0], together[j])
            assert all(torch.equal(a, b) for a, b in zip(c.k + c.v, together_caches[j].k + together_caches[j].v))
            ref = caches()[j]
            want, _ = m(p[None], kv_cache=ref, start_pos=st, logits_to_keep=1)
            torch.testing.assert_close(together[j], want[0, -1], rtol=1e-5, atol=1e-5)


@needs_c
def test_c_linear_equals_torch_and_rows_keep_their_bits():
    """_decodec.linear through Panels: x @ W, the fused residual add and the fused SwiGLU == torch in float64
    to fp32 rounding, for 1-9, 16 and 33 rows and widths that are not multiples of the 16/32-column
    panels; a row's output bits do not depend on how many rows share the call (the kernel's 8-row tiles
    and every remainder); bad shapes are a ValueError, not a crash."""
    torch.manual_seed(3)
    for K, N in ((256, 512), (70, 50), (33, 17), (704, 256)):
        w = torch.randn(N, K)
        p = Panels.pack(w)
        x, r = torch.randn(33, K), torch.randn(33, N)
        want = (x.double() @ w.double().T)
        got = Panels.mm(x, p)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * K ** 0.5)
        torch.testing.assert_close(Panels.mm(x, p, r).double(), want + r.double(), rtol=1e-5, atol=1e-4 * K ** 0.5)
        for M in (*range(1, 10), 16):
            assert torch.equal(Panels.mm(x[:M], p), got[:M])
            assert torch.equal(Panels.mm(x[M:M + 1], p)[0], got[M])  # a row alone == in company
    for K, F in ((64, 40), (256, 704)):
        w1, w3, x = torch.randn(F, K) / K ** 0.5, torch.randn(F, K), torch.randn(11, K)
        got = Panels.mm(x, Panels.pack_swiglu(w1, w3))
        want = torch.nn.functional.silu(x.double() @ w1.double().T) * (x.double() @ w3.double().T)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))
        assert torch.equal(Panels.mm(x[3:4], Panels.pack_swiglu(w1, w3))[0], got[3])
    # gates far outside exp's float range (the kernel clamps exp's argument to [-87, 88]): silu(-200) ~ 0,
    # silu(200) = 200, no inf or nan
    x, w1, w3 = torch.ones(1, 16), torch.linspace(-200, 200, 48)[:, None].repeat(1, 16) / 16, torch.ones(48, 16)
    got = Panels.mm(x, Panels.pack_swiglu(w1, w3))
    want = torch.nn.functional.silu(x.double() @ w1.double().T) * (x.double() @ w3.double().T)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        Panels.mm(torch.randn(2, 71), Panels.pack(torch.randn(8, 70)))
    with pytest.raises(ValueError):
        Panels.mm(torch.randn(2, 70, dtype=torch.float64), Panels.pack(torch.randn(8, 70)))


@needs_c
def test_c_step_rows_gives_each_row_its_bits_alone():
    """With the C kernels on one thread every op of the step is row-independent, so a row of a batched
    step_rows gets exactly (bitwise) the logits step() gives it alone: continuous batching's greedy
    results equal one-at-a-time's by construction, not only to rounding."""
    m = model()
    c = m.cfg
    fd = FastDecode(m, kernels="c")
    prompts = [[3, 14, 15], [35, 89, 79, 32, 38, 4, 7], [2, 71, 82, 81, 8]]
    L = 16
    k_pool = [torch.zeros(3, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    v_pool = [torch.zeros(3, c.n_kv_heads, L, c.head_dim) for _ in range(c.n_layers)]
    with torch.inference_mode(), num_threads(1):
        want = []
        for slot, p in enumerate(prompts):
            cache = m.new_kv_cache(1, L)
            fd.prefill(torch.tensor([p]), 0, cache)
            for i in range(c.n_layers):
                k_pool[i][slot], v_pool[i][slot] = cache.k[i][0], cache.v[i][0]
            want.append(fd.step(torch.tensor([9 + slot]), len(p), cache)[0])
        pos = torch.tensor([len(p) for p in prompts])
        mask = torch.arange(int(pos.max()) + 1)[None, :] <= pos[:, None]
        got = fd.step_rows(torch.tensor([9, 10, 11]), pos, k_pool, v_pool, torch.arange(3), (0, 3), mask)
        for b in range(3):
            assert torch.equal(got[b], want[b])


@needs_c
def test_c_linear_threads_give_the_same_bits_and_survive_fork():
    """_decodec.linear on 2 and 3 threads (its pool splits the panel pairs) == on 1, bitwise, for every mode;
    a FastDecode step on 2 threads == on 1, bitwise; after fork() the child (which has no pool threads)
    starts its own and gets the same result instead of waiting forever."""
    torch.manual_seed(5)
    w, r = Panels.pack(torch.randn(1000, 300)), None
    glu = Panels.pack_swiglu(torch.randn(400, 300) / 20, torch.randn(400, 300))
    for M in (1, 3, 8, 40):
        x, r = torch.randn(M, 300), torch.randn(M, 1000)
        for t in (2, 3):
            assert torch.equal(Panels.mm(x, w, None, t), Panels.mm(x, w, None, 1))
            assert torch.equal(Panels.mm(x, w, r, t), Panels.mm(x, w, r, 1))
            assert torch.equal(Panels.mm(x, glu, None, t), Panels.mm(x, glu, None, 1))
    m = model(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512)
    fd = FastDecode(m, kernels="c")
    with torch.inference_mode():
        steps = []
        for t in (1, 2):
            cache = m.new_kv_cache(2, 16)
            with num_threads(t):
                fd.prefill(torch.tensor([[5, 6, 7, 8]] * 2), 0, cache)
                steps.append(fd.step(torch.tensor([3, 4]), 4, cache))
        assert torch.equal(steps[0], steps[1])
    import ctypes
    import time

    want, got = Panels.mm(x, w, None, 1), torch.empty(x.shape[0], w.n)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 when the threaded call returns the same bits (no torch op here: torch's
        # OpenMP runtime itself is not fork-safe once the parent has used it)
        _decodec.linear(got.data_ptr(), x.data_ptr(), w.data.data_ptr(), 0, x.shape[0], w.k, w.p, w.n, 0, 2)
        n = want.numel() * 4
        os._exit(0 if ctypes.string_at(got.data_ptr(), n) == ctypes.string_at(want.data_ptr(), n) else 1)

    end = time.monotonic() + 30
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("a forked child hung in a threaded linear call")
