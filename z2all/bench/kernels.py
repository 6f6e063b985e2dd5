"""`z2all bench kernels`: forward+backward time and peak memory of every op, side by side per implementation.

    z2all bench kernels                                 # GPU: the 1B shape (seq 2048, dim 2048, vocab 64k)
    z2all bench kernels --ops=attention,cross_entropy --batch=4
    z2all bench kernels --out=kernels.md                # also write the table (atomically)

Rows per op: `eager` (the PyTorch reference, z2all.ops.reference), `compile` (torch.compile of the
reference), `triton` (ours, z2all.ops.triton), `liger` (Liger-Kernel; "n/a: not installed" without it), and
for attention `triton-atomic` (our kernel with the FlashAttention-2 atomic-dQ backward, ops.attention_bwd=
atomic), `sdpa` (PyTorch's scaled_dot_product_attention, default backend choice) plus `sdpa-flash` /
`sdpa-cudnn` pinned to one backend. "naive" attention is the eager row. Columns: fwd+bwd milliseconds (median
of `iters`), speed vs eager and vs compile (>1 = faster), and peak memory of one fwd+bwd above the inputs
(CUDA allocator) with its ratio to eager's (the fused cross-entropy's memory claim is read off that column
at vocab 64k). Attention also gets TFLOP/s with the FlashAttention paper's count: forward 4·B·H·T·S·D (QK^T
and PV), backward 2.5x the forward, i.e. 14·B·H·T·S·D for fwd+bwd, halved when causal with T == S.

`--ops=attention_varlen` (not in the default list; scripts/gpu_check.sh asks for it) times packed rows:
each row of T positions holds examples of random lengths (1 .. 2*--doc_len, seed 0), and attention stays
inside each example (segment_ids). Rows: `eager` (attention_naive with the block-diagonal causal mask),
`triton` / `triton-atomic` (the varlen kernel, which skips key blocks outside each query block's examples),
`sdpa` (SDPA with the boolean block mask, reference.attention_sdpa) and `triton-causal` (our kernel on the
same rows ignoring the segments: the plain causal cost, so its ratio to `triton` is what the skipping
saves; its output is not the packed attention). No compile row (it would cost the GPU check a compile).
TFLOP/s counts the useful work: 14*H*D*sum(L^2)/2 over the examples of every row.

Same precision for every row: inputs are in --dtype and, for 16-bit dtypes, every call runs under
torch.autocast(dtype) as the model's training step does. Without it the eager attention (attention_naive,
which upcasts q, k, v to fp32 for the spec's exact maths) would be timed as fp32 matmuls against bf16
kernels; under autocast its matmuls run in bf16, its softmax in fp32, as in a bf16 training run.

Each row is printed, and appended to --out, as soon as it is measured (eager and compile first: the other
rows are compared against them), so a run cut short keeps what it measured; at the end --out is replaced by
the aligned table.

On CPU the Triton and library rows are `n/a`: Triton kernels need a GPU (the interpreter that runs them on
CPU in tests is a numpy emulator, not a timing), so a CPU run compares eager, torch.compile and (attention)
SDPA at a small default shape (`--size=cpu`): ~2.5 min on 2 busy cores, nearly all of it compiling;
`--compile=false` takes ~10 s.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from z2all.bench import RowTable, machine_name
from z2all.config import opt
from z2all.utils import UserError, pick_device, pick_dtype

OPS = ("rmsnorm", "rope", "swiglu", "cross_entropy", "attention")
EXTRA_OPS = ("attention_varlen",)  # measured only when --ops names them

# op shapes: B, T, model dim, heads, kv heads, FFN width, vocab. "gpu" is the 1B (TinyLlama) shape at the
# original project's seq 2048 with a 64k vocabulary (the fused-CE memory target is quoted at 64k).
SIZES = {
    "gpu": dict(batch=4, seq=2048, dim=2048, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab=65536),
    "cpu": dict(batch=2, seq=256, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=704, vocab=8192),
}


@dataclass
class Config:
    ops: str = opt(",".join(OPS), "comma-separated ops to measure, in this order: " + ", ".join(OPS)
                   + "; also " + ", ".join(EXTRA_OPS) + " (packed rows, segment ids)")
    size: str = opt("auto", "default shapes: gpu (the 1B model at seq 2048, vocab 64k), cpu (small), auto "
                    "(gpu on CUDA, else cpu); the fields below override single values", choices=("auto", "gpu", "cpu"))
    batch: int = opt(0, "batch size B (0 = from --size)")
    seq: int = opt(0, "sequence length T (0 = from --size)")
    dim: int = opt(0, "model width C (0 = from --size)")
    n_heads: int = opt(0, "query heads H (0 = from --size); head dim = dim / n_heads")
    n_kv_heads: int = opt(0, "key/value heads (0 = from --size)")
    ffn_dim: int = opt(0, "SwiGLU width (0 = from --size)")
    vocab: int = opt(0, "vocabulary size V for the LM-head cross-entropy (0 = from --size)")
    doc_len: int = opt(0, "attention_varlen: mean example length in the packed rows (0 = seq / 8)")
    device: str = opt("auto", "auto | cuda | cpu")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    warmup: int = opt(3, "untimed fwd+bwd runs first (compilation and autotuning happen here)")
    iters: int = opt(10, "timed fwd+bwd runs; the median is reported")
    compile: bool = opt(True, "include torch.compile(reference) rows (compiling costs ~10-60 s per op)")
    out: str = opt("", "also write the markdown table to this file")


@dataclass
class Case:
    """One op's inputs and the impls to compare on them."""

    op: str  # the row label: op name and shapes
    make_inputs: Callable[[], tuple]  # -> (args requiring grad..., extra args)
    n_grad: int  # the first n_grad args get gradients
    impls: dict[str, Callable | str]  # name -> fn, or a string saying why the row is n/a
    flops: float = 0.0  # fwd+bwd FLOPs (attention only)
    key: str = ""  # the op's name in OPS


def _shapes(cfg: Config, device) -> dict:
    size = cfg.size if cfg.size != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    shapes = dict(SIZES[size])
    for key in shapes:
        if getattr(cfg, key):
            shapes[key] = getattr(cfg, key)
    if shapes["dim"] % shapes["n_heads"] or shapes["n_heads"] % shapes["n_kv_heads"]:
        raise UserError(f"bench kernels: dim ({shapes['dim']}) must divide by n_heads ({shapes['n_heads']}) and "
                        f"n_heads by n_kv_heads ({shapes['n_kv_heads']})")
    return shapes


def _triton_impl(module: str, fn: str, device):
    if device.type != "cuda":
        return "n/a: Triton needs a GPU"
    try:
        import importlib

        return getattr(importlib.import_module(f"z2all.ops.triton.{module}"), fn)
    except ImportError as e:
        return f"n/a: {e}"


def _liger_impl(fn: str, device):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "n/a: not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "n/a: Liger needs a GPU"
    try:
        from z2all.ops import liger
    except ImportError as e:
        return f"n/a: {str(e).splitlines()[0][:80]}"
    return getattr(liger, fn)


def _lig(impl, adapt):
    """The liger row: the reason string as is, else the adapted callable."""
    return impl if isinstance(impl, str) else adapt(impl)


class _SdpaBackend:
    """SDPA pinned to one backend. If that backend rejects GQA (enable_gqa), k/v are expanded to H heads
    inside the timed call (the cost a model would pay) and the row says so."""

    def __init__(self, backend_name: str):
        self.backend_name = backend_name
        self.note = ""

    def __call__(self, q, k, v):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, self.backend_name)):
            gqa = k.shape[1] != q.shape[1]
            if gqa and not self.note:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                except RuntimeError:
                    self.note = "kv expanded to H heads (no GQA in this backend)"
            if gqa:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def build_cases(cfg: Config, device, dtype) -> list[Case]:
    import torch

    from z2all.ops import reference as R

    s = _shapes(cfg, device)
    B, T, C, H, K, F, V = s["batch"], s["seq"], s["dim"], s["n_heads"], s["n_kv_heads"], s["ffn_dim"], s["vocab"]
    D = C // H
    N = B * T
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype)
    wanted = [o.strip() for o in cfg.ops.split(",") if o.strip()]
    for o in wanted:
        if o not in OPS + EXTRA_OPS:
            raise UserError(f"bench kernels: unknown op '{o}' in --ops; choose from {', '.join(OPS + EXTRA_OPS)}")

    def compiled(fn):
        if not cfg.compile:
            return None
        return torch.compile(fn, dynamic=False)

    cases = []
    if "rmsnorm" in wanted:
        eps = 1e-5
        ref = lambda x, w: R.rms_norm(x, w, eps)
        tri = _triton_impl("rmsnorm", "rms_norm", device)
        lig = _liger_impl("rms_norm", device)
        cases.append(Case(f"rmsnorm [{N}, {C}]", lambda: (rnd(N, C), rnd(C) + 1), 2, {
            "eager": ref, "triton": tri if isinstance(tri, str) else (lambda x, w: tri(x, w, eps)),
            "compile": compiled(ref), "liger": _lig(lig, lambda f: lambda x, w: f(x, w, eps))}))
    if "rope" in wanted:
        cos, sin = R.rope_cache(T, D, device=device)
        ref = lambda q, k: R.rope(q, k, cos, sin)
        tri = _triton_impl("rope", "rope", device)
        tri = tri if isinstance(tri, str) else (lambda q, k, f=tri: f(q, k, cos, sin))
        lig = _liger_impl("rope", device)
        # q as the model produces it: a [B, T, H, D] view transposed to [B, H, T, D]
        cases.append(Case(f"rope q[{B},{H},{T},{D}] k[{B},{K},{T},{D}]",
                          lambda: (rnd(B, T, H, D).transpose(1, 2), rnd(B, T, K, D).transpose(1, 2)), 2, {
                              "eager": ref, "triton": tri, "compile": compiled(ref),
                              "liger": _lig(lig, lambda f: lambda q, k: f(q, k, cos, sin))}))
    if "swiglu" in wanted:
        cases.append(Case(f"swiglu [{N}, {F}]", lambda: (rnd(N, F), rnd(N, F)), 2, {
            "eager": R.swiglu, "triton": _triton_impl("swiglu", "swiglu", device),
            "compile": compiled(R.swiglu), "liger": _liger_impl("swiglu", device)}))
    if "cross_entropy" in wanted:
        def ce_inputs():
            y = torch.randint(0, V, (N,), device=device)
            y[::17] = -100
            return rnd(N, C), rnd(V, C, scale=0.02), y
        cases.append(Case(f"linear+CE h[{N}, {C}] W[{V}, {C}]", ce_inputs, 2, {
            "eager": R.linear_cross_entropy,
            "triton": _triton_impl("cross_entropy", "linear_cross_entropy", device),
            "compile": compiled(R.linear_cross_entropy), "liger": _liger_impl("linear_cross_entropy", device)}))
    if "attention" in wanted:
        impls = {"eager": lambda q, k, v: R.attention_naive(q, k, v, causal=True),
                 "triton": _triton_impl("attention", "attention", device),
                 "triton-atomic": _triton_impl("attention", "attention_atomic_dq", device),
                 "compile": compiled(lambda q, k, v: R.attention_naive(q, k, v, causal=True)),
                 "sdpa": lambda q, k, v: R.attention_sdpa(q, k, v, causal=True)}
        if device.type == "cuda":
            impls["sdpa-flash"] = _SdpaBackend("FLASH_ATTENTION")
            impls["sdpa-cudnn"] = _SdpaBackend("CUDNN_ATTENTION")
        flops = 14.0 * B * H * T * T * D / 2  # causal, T == S
        cases.append(Case(f"attention causal q[{B},{H},{T},{D}] kv[{B},{K},{T},{D}]",
                          lambda: (rnd(B, T, H, D).transpose(1, 2), rnd(B, T, K, D).transpose(1, 2),
                                   rnd(B, T, K, D).transpose(1, 2)), 3, impls, flops))
    if "attention_varlen" in wanted:
        cases.append(_varlen_case(cfg, B, T, H, K, D, device, rnd))
    for case, key in zip(cases, [o for o in OPS + EXTRA_OPS if o in wanted]):
        case.key = key
    return sorted(cases, key=lambda c: wanted.index(c.key))  # the order asked for: the headline op first


def _varlen_case(cfg: Config, B: int, T: int, H: int, K: int, D: int, device, rnd) -> Case:
    """Packed rows: examples of 1 .. 2*doc_len positions (seed 0, different per row) filling each row."""
    import torch

    from z2all.ops import reference as R

    mean = cfg.doc_len or max(1, T // 8)
    if mean < 1:
        raise UserError(f"bench kernels: --doc_len must be >= 1 (got {mean})")
    g = torch.Generator().manual_seed(0)
    rows, work, n_docs = [], 0, 0
    for _ in range(B):
        ids: list[int] = []
        while len(ids) < T:
            n = min(T - len(ids), int(torch.randint(1, 2 * mean + 1, (1,), generator=g)))
            ids += [n_docs] * n
            work += n * n
            n_docs += 1
        rows.append(ids)
    seg = torch.tensor(rows, dtype=torch.int32, device=device)

    def triton(fn_name, segments=True):
        f = _triton_impl("attention", fn_name, device)
        if isinstance(f, str):
            return f
        if segments:
            return lambda q, k, v, s: f(q, k, v, causal=True, segment_ids=s)
        return lambda q, k, v, s: f(q, k, v, causal=True)

    def sdpa(q, k, v, s):
        return R.attention_sdpa(q, k, v, causal=True, segment_ids=s)
    sdpa.note = "boolean block-diagonal causal mask"

    impls = {"eager": lambda q, k, v, s: R.attention_naive(q, k, v, causal=True, segment_ids=s),
             "triton": triton("attention"), "triton-atomic": triton("attention_atomic_dq"), "sdpa": sdpa,
             "triton-causal": triton("attention", segments=False)}
    return Case(f"attention varlen q[{B},{H},{T},{D}] kv[{B},{K},{T},{D}] {n_docs} docs of ~{mean}",
                lambda: (rnd(B, T, H, D).transpose(1, 2), rnd(B, T, K, D).transpose(1, 2),
                         rnd(B, T, K, D).transpose(1, 2), seg), 3, impls, 14.0 * H * D * work / 2)


def measure(fn: Callable, make_inputs: Callable, n_grad: int, device, warmup: int, iters: int) -> tuple[float, int]:
    """Median fwd+bwd seconds and peak bytes above the inputs (-1 on CPU) of fn(*make_inputs())."""
    import torch

    args = list(make_inputs())
    leaves = [a.detach().requires_grad_() for a in args[:n_grad]]
    args = leaves + args[n_grad:]
    cuda = device.type == "cuda"

    def step():
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) if o.dim() == 0 else torch.full_like(o, 1e-3) for o in outs]
        torch.autograd.grad(outs, leaves, grads)

    for _ in range(warmup):
        step()
    peak = -1
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


NOTES = {"triton": "split bwd (dK/dV + dQ kernels)", "triton-atomic": "atomic-dQ bwd (one kernel)",
         "triton-causal": "segments ignored: the whole-row causal cost (TFLOP/s not comparable)"}


def _autocast(fn: Callable, device, dtype) -> Callable:
    """fn under torch.autocast(dtype) for 16-bit dtypes (what a bf16 training step runs), else fn."""
    import torch

    if dtype == torch.float32:
        return fn

    def run_autocast(*args):
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args)
    run_autocast.note = getattr(fn, "note", "")  # _SdpaBackend's note
    return run_autocast


def _order(impls: dict) -> list[str]:
    """eager and compile first (every other row is compared against them), then the rest as listed."""
    first = [n for n in ("eager", "compile") if n in impls]
    return first + [n for n in impls if n not in first]


def run(cfg: Config) -> int:
    import torch

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.iters < 1 or cfg.warmup < 0:
        raise UserError("bench kernels: --iters must be >= 1 and --warmup >= 0")
    torch.manual_seed(0)
    cases = build_cases(cfg, device, dtype)
    dt_name = str(dtype).replace("torch.", "")
    precision = dt_name if dtype == torch.float32 else f"{dt_name} inputs under {dt_name} autocast"
    headers = ["op", "impl", "fwd+bwd ms", "vs eager", "vs compile", "peak MiB", "mem vs eager", "TFLOP/s", "note"]
    table = RowTable(f"## z2all bench kernels ({machine_name()}, {precision}, fwd+bwd, median of {cfg.iters})",
                     headers, cfg.out)
    for case in cases:
        results: dict[str, tuple[float, int]] = {}
        for name in _order(case.impls):
            fn = case.impls[name]
            if fn is None:
                continue  # not asked for (compile off)
            if isinstance(fn, str):
                table.row([case.op, name, "-", "-", "-", "-", "-", "-", fn])
                continue
            timed = _autocast(fn, device, dtype)
            try:
                res = measure(timed, case.make_inputs, case.n_grad, device, cfg.warmup, cfg.iters)
            except Exception as e:  # one failing backend (e.g. cuDNN attention on this GPU) is a row, not a crash
                msg = str(e).splitlines()[0][:80] if str(e) else ""
                table.row([case.op, name, "-", "-", "-", "-", "-", "-", f"failed: {type(e).__name__}: {msg}"])
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results[name] = res
            sec, peak = res
            eager, comp = results.get("eager"), results.get("compile")
            vs = lambda other, ref, sec=sec, name=name: ("ref" if name == ref else
                                                         f"{other[0] / sec:.2f}x" if other else "-")
            tflops = f"{case.flops / sec / 1e12:.3g}" if case.flops else "-"
            mem = f"{peak / eager[1]:.2f}x" if eager and name != "eager" and peak >= 0 and eager[1] > 0 else "-"
            note = "; ".join(n for n in (NOTES.get(name, "") if case.flops else "", getattr(timed, "note", "")) if n)
            table.row([case.op, name, f"{sec * 1e3:.3f}", vs(eager, "eager"), vs(comp, "compile"),
                       f"{peak / 2**20:.0f}" if peak >= 0 else "n/a", mem, tflops, note])
    notes = ["vs eager / vs compile: that row's time divided into the reference's (>1 = faster; ref = the "
             "reference itself). peak MiB: allocator peak of one fwd+bwd above the inputs (CUDA only); mem vs "
             "eager: that peak over eager's (<1 = less memory). Attention TFLOP/s: 14*B*H*T*S*D/2 (fwd 4BHTSD + "
             "bwd 2.5x, causal half)."]
    if device.type != "cuda":
        notes.append("CPU run: Triton/Liger/SDPA-backend rows need a GPU (the Triton interpreter is not a timing); "
                     "run on CUDA for the kernel comparison.")
    table.finish(notes)
    return 0
