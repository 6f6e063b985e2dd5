"""Text generation with a preallocated KV cache: greedy, temperature, top-k, top-p (nucleus) and
repetition-penalty sampling; stops at EOS or stop strings; streams to the terminal; batched prompts of
different lengths (left-padded, with a key padding mask and per-row RoPE positions).

    z2all generate --ckpt runs/demo/checkpoints/step-1000 --prompt "Once upon a time" --max-new-tokens 100
    z2all generate --ckpt CKPT --prompt-file prompts.txt --temperature 0    # one batch, greedy

From Python (the trainer's sample generations):

    from z2all.model.generate import generate
    new_ids = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, eos_id=tok.eos_token_id)

The tokenizer is `--tokenizer DIR`, else `<ckpt>/tokenizer/` (an export's own directory), loaded with
transformers.AutoTokenizer. --ckpt may also be a run directory (its latest checkpoint, named on stderr) or a
`z2all export hf` directory. Settings are checked before the model loads (`check_sampling`), a tokenizer
bigger than the model's vocabulary is refused (`check_vocab_fits`), and the KV cache is sized against free
memory first (`plan_memory`); these are shared with any later command that samples.

Decoding: `--decode fast` (default) runs each new token through FastDecode (fused weights; compiled
RMSNorm, attention and matrix multiplies, `--decode-kernels`; else torch's ops with oneDNN for several
rows and for the prompt on an x86 CPU, `--batched-matmul`; see the class), `--decode plain`
through the model's forward (the reference; both give the same tokens). The prefill and decode steps of a
model under 64 MB run on one CPU thread (`decode_threads`; `--decode-threads N` sets it), where torch's
per-op threading costs more than it saves.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.config import opt
from z2all.utils import UserError, human_bytes, pick_device, pick_dtype, seed_everything


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] with -inf outside the sampling set: top_k keeps the k most likely tokens (0 = all);
    top_p keeps the smallest set whose probability reaches p, always at least one (1.0 = all)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (so the first is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next token ids [B]. temperature 0 = greedy (argmax); otherwise
    softmax(logits / temperature) restricted by filter_logits, in transformers' order."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers applies it): for tokens already in the row (prompt or output),
    positive logits are divided by `penalty` and negative ones multiplied. seen [B, V] bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def check_sampling(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, max_new_tokens: int = 1) -> None:
    """Raise a UserError naming the option when a sampling setting is outside its range (shared by every
    command that samples: generate, and chat/serve later)."""
    checks = [
        ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0, ">= 0 (0 = greedy)"),
        ("--top-k", top_k, top_k >= 0, ">= 0 (0 = off)"),
        ("--top-p", top_p, math.isfinite(top_p) and 0 < top_p <= 1, "in (0, 1] (1 = off)"),
        ("--repetition-penalty", repetition_penalty,
         math.isfinite(repetition_penalty) and repetition_penalty > 0, "> 0 (1 = off)"),
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
    ]
    for name, value, ok, rule in checks:
        if not ok:
            raise UserError(f"{name} must be {rule}, got {value}")


BATCHED_MATMULS = ("auto", "onednn", "blas")
KERNELS = ("auto", "c", "torch")

try:  # the compiled decode attention (model/_decodec.c, built by `pip install -e .`; optional)
    from z2all.model import _decodec
except ImportError:
    _decodec = None


def onednn_linear_ok() -> bool:
    """torch's oneDNN linear ops are there (x86 CPU builds) and this is an x86 machine (on other machines
    the ops may exist without oneDNN's fast kernels)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._linear_pointwise.binary and torch.ops.mkldnn._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


class Panels:
    """A weight packed for _decodec.linear (model/_decodec.c): W = weight^T [K, N] cut into panels of 16
    columns (zero past column N), stored two by two: data [P / 2, K, 32], a pair's two panels side by side
    in each row, so the kernel's tile (up to 8 rows x one pair) streams one contiguous block. pack_swiglu
    pairs the FFN's gate and up projections (gate columns 16q.. and the same up columns in pair q) and its
    mm returns silu(gate) * up. The ops take contiguous fp32 rows x [M, K] and return [M, N]."""
    __slots__ = ("data", "k", "p", "n", "mode")

    def __init__(self, data: torch.Tensor, n: int, mode: int):
        self.data, self.p, self.k = data, 2 * data.shape[0], data.shape[1]
        self.n, self.mode = n, mode  # mode 0: x @ W; 2: SwiGLU (1, the residual add, is mm's with res)

    @classmethod
    def pack(cls, weight: torch.Tensor) -> Panels:
        """weight [N, K] (nn.Linear's layout)."""
        N, K = weight.shape
        Np = -(-N // 32) * 32
        w = torch.zeros(Np, K, dtype=torch.float32)
        w[:N] = weight.detach()
        return cls(w.view(Np // 32, 32, K).transpose(1, 2).contiguous(), N, 0)

    @classmethod
    def pack_swiglu(cls, w1: torch.Tensor, w3: torch.Tensor) -> Panels:
        """w1 (gate) and w3 (up), each [F, K]."""
        F, K = w1.shape
        Fp = -(-F // 16) * 16
        w = torch.zeros(2, Fp, K, dtype=torch.float32)
        w[0, :F], w[1, :F] = w1.detach(), w3.detach()
        return cls(w.view(2, Fp // 16, 16, K).permute(1, 3, 0, 2).reshape(Fp // 16, K, 32).contiguous(), F, 2)

    @staticmethod
    def mm(x: torch.Tensor, w: Panels, res: torch.Tensor | None = None, threads: int = 1) -> torch.Tensor:
        """x @ W (or silu(gate) * up), plus res when given (the add fused into the kernel's store); on
        `threads` threads (the caller's and _decodec's own pool; the bits do not depend on the count)."""
        if not x.is_contiguous():  # a view's strides are not what the C code indexes
            x = x.contiguous()
        if x.dtype != torch.float32 or x.shape[-1] != w.k or (res is not None and not res.is_contiguous()):
            raise ValueError(f"Panels.mm needs contiguous fp32 rows of {w.k} (and a contiguous residual)")
        out = torch.empty(x.shape[0], w.n)
        _decodec.linear(out.data_ptr(), x.data_ptr(), w.data.data_ptr(), 0 if res is None else res.data_ptr(),
                        x.shape[0], w.k, w.p, w.n, 1 if res is not None else w.mode, threads)
        return out


class CacheRows:
    """Some rows of a KVCache as a KVCache of their own (k[layer], v[layer]: views [rows, K, len, D]): one
    sequence's rows for prefill_many, one serving slot for FastDecode.step (serve/engine.py)."""

    def __init__(self, k: list, v: list):
        self.k, self.v = k, v


class FastDecode:
    """The one-token decode step with as few tensor ops as the math allows (`decode="fast"`; the model's own
    forward is the reference, `decode="plain"`). At batch 1 on a small model the per-op framework cost and
    the matmul library's small-matrix path, not the arithmetic, set the speed: the tiny preset's plain step
    runs ~45 ops per layer. Here, per layer (~17 ops):

    - weights are copied once, transposed to [in, out] row-major: `x @ W^T` through torch.mm/addmm on that
      layout is ~20% faster per matmul than F.linear's transposed-weight call for a 1-row x (MKL, fp32, 1
      thread: 17.7 vs 22.2 us for the 256x1408 gate/up matrix);
    - q/k/v are one matmul, and so are the FFN's gate and up;
    - the residual adds are fused into the matmuls (torch.addmm(x, h, W) = x + h @ W);
    - RMSNorm is one aten op (torch.rms_norm) in fp32 (the upcasting formula otherwise);
    - RoPE is qk * cos + roll(qk, D/2) * sin_signed on q and k together (rotate-half with the sign folded
      into a precomputed table), two ops plus the roll;
    - on CPU in fp32 with MKL, the LM head (the largest matrix: V x C) goes through MKL's packed sgemm
      (weights reordered once; 47.7 vs 73.5 us for 4096x256).

    `kernels` "c" ("auto": fp32 on the CPU with the compiled model/_decodec.c built; "torch" keeps the ops
    above, the reference) replaces most of that with calls into C: each RMSNorm (1.0-1.2 us against
    torch.rms_norm's 7-14), each layer's RoPE, cache write and causal attention (12.8 us for 8 rows of ~80
    keys against ~57 for the torch ops; the mask is implied: row b sees keys 0..pos[b] of its slot), and
    every matrix multiply: _decodec.linear over weights packed once into 16-column panels (Panels), with the
    residual add and the SwiGLU fused into its stores, on the step's intra-op thread count (torch's, which
    decode_threads sets: the calling thread plus the extension's own pool). It computes each output with
    one accumulator over k in order, so a row gets the same bits whatever rows share the call and however
    many threads split it: a batched step gives each row exactly what step() gives it alone, and a prompt
    chunk in prefill_many what it gets alone. Why ours: at decode sizes torch's oneDNN linear costs ~10 us
    a call before any arithmetic and MKL's sgemm runs its AVX2 path on AMD Zen 5; the tiny preset's 8-row
    step went 867 -> ~440 us with it, its 1-row step ~260 -> 245 us, and the 125m preset's decode on 2
    threads 56 -> 112 tokens/s (docs/performance.md, "Decode speed").

    With kernels "torch", rows of a batch (B >= 2) and prompt prefills take oneDNN where `batched_matmul`
    resolves to "onednn" ("auto": an x86 CPU in fp32; "blas" keeps torch.mm/addmm, the reference): ~250 vs ~108 GFLOP/s
    for MKL on Zen 5. Its weights are packed once, on first use, for up to PACK_ROWS rows; a packed oneDNN
    matmul also gives a row the same bits whatever the row count (MKL's can change from 4 rows on), and
    the residual add is fused into it (_linear_pointwise.binary). A single row stays on MKL there. "auto"
    keeps MKL when the packed copy would take more than half of the free memory.

    No [B, T] bookkeeping, no mask, no op switch. It reads and writes the same KVCache as the forward (the
    prompt is prefilled by the forward, or by prefill()/prefill_many() where `prefills`), and
    plain PyTorch (and the C calls) only: the model's op switch (Triton kernels) applies to the forward, not to these
    steps. Rows of step() share one position (generate() falls back to the forward for left-padded
    batches); step_rows() gives each row its own (the serving engine).

    The copies (transposed, oneDNN-packed, Panels: each built on first use by the path that needs it) are
    reused while the model's parameters are unchanged (their storage and version counters are the key), so
    a trainer's sample generations between steps rebuild them. Each costs one more copy of the block
    weights and the LM head in memory; with the C kernels only the Panels are built."""

    PACK_ROWS = 16  # oneDNN's packing hint: measured flat cost for 1-4 rows and 1.6x a row's for 16

    def __init__(self, model, batched_matmul: str = "auto", kernels: str = "auto"):
        if batched_matmul not in BATCHED_MATMULS:
            raise UserError(f"--batched-matmul must be one of {', '.join(BATCHED_MATMULS)}, got {batched_matmul!r}")
        if kernels not in KERNELS:
            raise UserError(f"--decode-kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        self.model = model
        c = model.cfg
        self.H, self.K, self.D, self.C = c.n_heads, c.n_kv_heads, c.head_dim, c.dim
        self.F = c.ffn_hidden
        self.eps = c.norm_eps
        w = model.tok_embeddings.weight
        self.fp32 = w.dtype == torch.float32
        self.head = model.output.weight.detach()
        self._mkl_layers = None  # (norm, Wqkv^T, Wo^T, norm, W13^T, W2^T) per layer for torch.mm: _torch_layers()
        self.head_packed = None
        self.panels = None  # the same weights packed for _decodec.linear: _c_layers()
        self.key = self._key(model)
        self.tables: dict = {}
        self.batched_matmul = batched_matmul
        if batched_matmul == "auto":
            self.batched_matmul = "onednn" if self.fp32 and w.device.type == "cpu" and onednn_linear_ok() else "blas"
            # the packed copy is one more copy of the weights (made on the first batched step or prefill):
            # auto takes it only where it leaves half of the free memory (a 1B fp32 model: 4 GB more)
            free = _available_memory(w.device) if self.batched_matmul == "onednn" else None
            packed = sum(p.numel() for p in model.layers.parameters()) * 4 + self.head.numel() * 4
            if free is not None and packed > free // 2:
                self.batched_matmul = "blas"
        self.packed = None  # (layers, head) in oneDNN's layout, built by _batched() on first use
        cpu32 = self.fp32 and w.device.type == "cpu"
        if kernels == "c" and not (cpu32 and _decodec is not None):
            raise UserError("--decode-kernels c needs an fp32 model on the CPU and the compiled z2all.model._decodec "
                            "(`pip install -e .` builds it where a C compiler is installed); use auto or torch")
        self.kernels = kernels if kernels != "auto" else ("c" if cpu32 and _decodec is not None else "torch")

    def _torch_layers(self) -> list:
        """Per layer (norm, Wqkv^T, Wo^T, norm, W13^T, W2^T): the weights transposed to [in, out] for
        torch.mm, and the LM head packed for MKL where it can be; built on first use."""
        if self._mkl_layers is None:
            with torch.no_grad():
                self._mkl_layers = []
                for b in self.model.layers:
                    a, f = b.attention, b.feed_forward
                    self._mkl_layers.append((
                        b.attention_norm.weight.detach(),
                        torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).t().contiguous(),
                        a.wo.weight.detach().t().contiguous(), b.ffn_norm.weight.detach(),
                        torch.cat([f.w1.weight, f.w3.weight]).t().contiguous(), f.w2.weight.detach().t().contiguous()))
                if self.fp32 and self.head.device.type == "cpu" and torch._C.has_mkl:
                    try:
                        self.head_packed = torch.ops.mkl._mkl_reorder_linear_weight(self.head, 1)
                    except (RuntimeError, AttributeError):  # a build without the op: F.linear
                        self.head_packed = None
        return self._mkl_layers

    def _batched(self):
        """The oneDNN-packed weights (the _torch_layers tuple layout), packed on first use."""
        if self.packed is None:
            pack = torch.ops.mkldnn._reorder_linear_weight
            with torch.no_grad():
                layers = [(wn1, pack(wqkv.t().contiguous(), self.PACK_ROWS), pack(wo.t().contiguous(), self.PACK_ROWS),
                           wn2, pack(w13.t().contiguous(), self.PACK_ROWS), pack(w2.t().contiguous(), self.PACK_ROWS))
                          for wn1, wqkv, wo, wn2, w13, w2 in self._torch_layers()]
                self.packed = (layers, pack(self.head, self.PACK_ROWS))
        return self.packed

    def _c_layers(self):
        """(layers, head) packed for _decodec.linear (Panels; the gate and up projections interleaved for
        its fused SwiGLU), built on first use."""
        if self.panels is None:
            with torch.no_grad():
                layers = []
                for b in self.model.layers:
                    a, f = b.attention, b.feed_forward
                    layers.append((b.attention_norm.weight.detach(),
                                   Panels.pack(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight])),
                                   Panels.pack(a.wo.weight), b.ffn_norm.weight.detach(),
                                   Panels.pack_swiglu(f.w1.weight, f.w3.weight), Panels.pack(f.w2.weight)))
                self.panels = (layers, Panels.pack(self.head))
        return self.panels

    def _ops(self, B: int):
        """(layers, mm, addmm, glu, head) for a B-row step: mm(x, w) = x @ W^T, addmm(r, x, w) = r + x @ W^T,
        glu(x, w13) = silu(x @ W1^T) * (x @ W3^T), head(h) = logits. B = 0: ops whose rows do not depend on
        how many rows share the call (prefill_many: a chunk's numbers must not depend on its company);
        _decodec.linear's (kernels "c") have that property for any B and thread count."""
        if self.kernels == "c":
            layers, head = self._c_layers()
            t = torch.get_num_threads()  # the step's intra-op threads (decode_threads) split each matmul

            def mm(x, w):
                return Panels.mm(x, w, None, t)

            return layers, mm, lambda r, x, w: Panels.mm(x, w, r, t), mm, lambda h: Panels.mm(h, head, None, t)
        F = self.F

        def glu(x, w13, mm):
            h = mm(x, w13)
            return torch.nn.functional.silu(h[:, :F]).mul_(h[:, F:])

        if B != 1 and self.batched_matmul == "onednn":
            layers, head = self._batched()
            lin = torch.ops.mkldnn._linear_pointwise

            def mm(x, w):
                return lin(x, w, None, "none", [], "")

            return (layers, mm, lambda r, x, w: lin.binary(x, r, w, None, "add"), lambda x, w: glu(x, w, mm),
                    lambda h: lin(h, head, None, "none", [], ""))
        return self._torch_layers(), torch.mm, torch.addmm, lambda x, w: glu(x, w, torch.mm), self._head

    @staticmethod
    def _key(model) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())

    @staticmethod
    def supports(model) -> bool:
        """Only plain nn.Linear projections without hooks: a LoRA-wrapped model (model/lora.py LoraLinear)
        or one with forward hooks must take the forward, which runs them."""
        import torch.nn as nn

        for b in model.layers:
            a, f = b.attention, b.feed_forward
            for lin in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3):
                if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
                    return False
        return type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding

    @classmethod
    def for_model(cls, model, batched_matmul: str = "auto", kernels: str = "auto") -> FastDecode | None:
        """The model's FastDecode (built once per weights, batched_matmul and attention), or None when it
        does not support the model or its copy of the weights would not fit in memory (a note says so)."""
        if not cls.supports(model):
            return None
        fd = model.__dict__.get("_z2all_fast_decode")
        if (fd is None or fd.key != cls._key(model) or batched_matmul not in ("auto", fd.batched_matmul)
                or kernels not in ("auto", fd.kernels)):
            # every path builds one more copy of the block weights and the LM head on its first step: where
            # that would not fit, decode through the model's forward (no copy) instead of running out of
            # memory in the middle of a generation
            w = model.tok_embeddings.weight
            need = (sum(p.numel() for p in model.layers.parameters()) + model.output.weight.numel()) * w.element_size()
            free = _available_memory(w.device)
            if free is not None and need > 0.8 * free:
                if not model.__dict__.get("_z2all_fast_decode_noted"):
                    model.__dict__["_z2all_fast_decode_noted"] = True
                    print(f"note: the fast decoder's copy of the weights ({human_bytes(need)}) does not fit in the "
                          f"{human_bytes(free)} of free memory; decoding with the model's forward instead (slower, "
                          f"the same tokens: --decode plain)", file=sys.stderr, flush=True)
                return None
            fd = cls(model, batched_matmul, kernels)
            model.__dict__["_z2all_fast_decode"] = fd
        return fd

    def _rope(self, device, n: int):
        t = self.tables.get(device)
        if t is None or t[0].shape[0] < n:
            cos, sin = self.model._rope_table(device, n)  # [n, D/2] fp32
            dtype = self.model.tok_embeddings.weight.dtype
            t = (torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype))
            self.tables[device] = t
        return t

    def _rms(self, x, w):
        if self.kernels == "c" and x.is_contiguous():  # 1.0-1.2 us a call against torch.rms_norm's 7-14
            out = torch.empty_like(x)
            _decodec.rms(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // self.C, self.C, self.eps)
            return out
        if self.fp32:
            return torch.rms_norm(x, (self.C,), w, self.eps)
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _out_ffn(self, x, y, wo, wn2, w13, w2, addmm, glu):
        """The rest of a block after attention: x + y @ Wo, then x + SwiGLU(RMSNorm(x)) with gate and up in
        one matmul; addmm/glu from _ops."""
        x = addmm(x, y, wo)
        return addmm(x, glu(self._rms(x, wn2), w13), w2)

    def _head(self, h):
        if self.head_packed is not None:
            return torch.ops.mkl._mkl_linear(h, self.head_packed, self.head, None, h.shape[0])
        return torch.nn.functional.linear(h, self.head)

    def step(self, tokens: torch.Tensor, pos: int, cache) -> torch.Tensor:
        """tokens [B] at position pos (every row) -> logits [B, V]; writes their keys/values at pos."""
        H, K, D = self.H, self.K, self.D
        B = tokens.shape[0]
        tables = self._rope(tokens.device, pos + 1)
        if self.kernels != "c":
            cos, sin = tables[0][pos], tables[1][pos]
        x = self.model.tok_embeddings.weight.index_select(0, tokens)  # [B, C]
        nqk = (H + K) * D
        sdpa = torch.nn.functional.scaled_dot_product_attention
        layers, mm, addmm, glu, head = self._ops(B)
        for i, (wn1, wqkv, wo, wn2, w13, w2) in enumerate(layers):
            qkv = mm(self._rms(x, wn1), wqkv)  # [B, (H + 2K) * D]
            kc, vc = cache.k[i], cache.v[i]
            if self.kernels == "c":
                y = self._attend_c(qkv, kc, vc, None, None, pos, tables)
            else:
                qk = qkv[:, :nqk].view(B, H + K, D)
                qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)
                kc.select(2, pos).copy_(qk[:, H:])
                vc.select(2, pos).copy_(qkv[:, nqk:].view(B, K, D))
                y = sdpa(qk[:, :H, None], kc.narrow(2, 0, pos + 1), vc.narrow(2, 0, pos + 1), enable_gqa=K != H)
            x = self._out_ffn(x, y.reshape(B, H * D), wo, wn2, w13, w2, addmm, glu)
        return head(self._rms(x, self.model.norm.weight))

    def _attend_c(self, qkv, kc, vc, rows, pos, pos0: int, tables) -> torch.Tensor:
        """_decodec.attend on the step's qkv [B, (H + 2K) * D]: RoPE, the new key/value written into kc/vc
        [slots, K, L, D] at (rows[b], pos[b]) (rows None = slot b; pos None = every row at pos0), causal
        attention over each row's slot. Returns [B, H * D]. Contiguity is checked here: the C code indexes
        by these layouts."""
        B = qkv.shape[0]
        cos, sin = tables
        for t in (qkv, kc, vc, rows, pos):
            if t is not None and not t.is_contiguous():
                raise ValueError("FastDecode kernels='c' needs contiguous qkv, cache, rows and positions")
        if (rows is not None and rows.dtype != torch.int64) or (pos is not None and pos.dtype != torch.int64):
            raise ValueError("FastDecode kernels='c' needs int64 rows and positions")
        out = torch.empty(B, self.H * self.D)
        _decodec.attend(qkv.data_ptr(), kc.data_ptr(), vc.data_ptr(), 0 if rows is None else rows.data_ptr(),
                        0 if pos is None else pos.data_ptr(), pos0, cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                        B, self.H, self.K, self.D, kc.shape[2], kc.shape[0], cos.shape[0])
        return out

    @property
    def prefills(self) -> bool:
        """Whether prefill()/prefill_many() are the faster way to fill a prompt: with _decodec.linear (kernels
        "c") or oneDNN's packed weights (a 33-token prompt of the tiny preset: 1.35-1.5 ms with the C
        kernels, 1.65-1.7 ms with oneDNN, 3.2 ms through the forward's MKL matmuls); elsewhere (GPUs, other
        CPUs) the forward, with the op switch's kernels, is as fast or faster."""
        return self.kernels == "c" or self.batched_matmul == "onednn"

    def prefill(self, tokens: torch.Tensor, start: int, cache) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 of every row (no padding) -> the last position's
        logits [B, V]; writes their keys/values into cache (k[layer], v[layer]: [B, K, len, D]). generate()'s
        prompt: prefill_many with one part per row."""
        rows = [CacheRows([k[b:b + 1] for k in cache.k], [v[b:b + 1] for v in cache.v]) for b in range(len(tokens))]
        return self.prefill_many([(tokens[b], start, rows[b]) for b in range(len(tokens))])

    def prefill_many(self, parts: list) -> torch.Tensor:
        """Prompt chunks of several sequences in one pass: parts = [(ids [T_j], start_j, cache_j)], each
        cache_j one sequence's KVCache rows (k[layer], v[layer]: [1, K, len, D]). Writes each chunk's
        keys/values at start_j..start_j+T_j-1 of its cache; chunk j attends causally to its own cache's
        positions 0..start_j+T_j-1 only. Returns the logits of each chunk's last position [n_parts, V]. The
        forward's math with the decode step's ops: the matrix multiplies run once over all chunks' rows
        (_decodec.linear's and oneDNN's packed matmul give a row the same bits whatever rows share the call,
        so a chunk's numbers do not depend on its company), RoPE per row at its own position, attention per
        chunk (with kernels "c", _decodec.attend over the chunk's rows in order: each writes its key, then
        attends to keys 0..its position, the causal mask implied). For the
        engine's prompt chunks of one iteration (3 prompts of ~33 tokens: one call instead of three) and
        generate()'s prompt."""
        H, K, D = self.H, self.K, self.D
        dev = parts[0][0].device
        lens = [len(ids) for ids, _, _ in parts]
        N = sum(lens)
        tokens = torch.cat([ids for ids, _, _ in parts]) if len(parts) > 1 else parts[0][0]
        tables = self._rope(dev, max(st + n for (_, st, _), n in zip(parts, lens)))
        x = self.model.tok_embeddings.weight.index_select(0, tokens)  # [N, C]
        layers, mm, addmm, glu, head = self._ops(0)
        nqk = (H + K) * D
        c_attention = self.kernels == "c"
        if c_attention:  # each chunk's rows are one-token steps of its slot at start..start+T-1, in order
            zeros = torch.zeros(max(lens), dtype=torch.long, device=dev)
            chunk_pos = [torch.arange(st, st + n, device=dev) for (_, st, _), n in zip(parts, lens)]
        else:
            pos = torch.cat([torch.arange(st, st + n, device=dev) for (_, st, _), n in zip(parts, lens)])
            cos, sin = tables[0][pos][:, None], tables[1][pos][:, None]  # [N, 1, D]
            # chunk j's query i (position start + i) sees keys 0..start + i; None = SDPA's own causal mask,
            # which is aligned to the top left and so only right when start == 0
            masks = [None if st == 0 else
                     torch.arange(st + n, device=dev)[None, :] <= torch.arange(st, st + n, device=dev)[:, None]
                     for (_, st, _), n in zip(parts, lens)]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for i, (wn1, wqkv, wo, wn2, w13, w2) in enumerate(layers):
            qkv = mm(self._rms(x, wn1), wqkv)  # [N, (H + 2K) * D]
            ys, off = [], 0
            if c_attention:
                # row r of a chunk writes its key at start + r, then attends to keys 0..start + r: the C code
                # takes the rows in order, so the chunk's causal mask is implied
                for (_, _, cache), n, p in zip(parts, lens, chunk_pos):
                    ys.append(self._attend_c(qkv[off:off + n], cache.k[i], cache.v[i], zeros[:n], p, 0, tables))
                    off += n
            else:
                qk = qkv[:, :nqk].view(N, H + K, D)
                qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)
                v = qkv[:, nqk:].view(N, K, D)
                for (_, st, cache), n, mask in zip(parts, lens, masks):
                    kc, vc = cache.k[i], cache.v[i]
                    kc[0, :, st:st + n] = qk[off:off + n, H:].transpose(0, 1)
                    vc[0, :, st:st + n] = v[off:off + n].transpose(0, 1)
                    y = sdpa(qk[off:off + n, :H].transpose(0, 1)[None], kc[:, :, :st + n], vc[:, :, :st + n],
                             attn_mask=mask, is_causal=mask is None and n > 1, enable_gqa=K != H)  # [1, H, n, D]
                    ys.append(y[0].transpose(0, 1).reshape(n, H * D))
                    off += n
            x = self._out_ffn(x, torch.cat(ys) if len(ys) > 1 else ys[0], wo, wn2, w13, w2, addmm, glu)
        last = x.index_select(0, torch.tensor(list(itertools.accumulate(lens)), device=dev) - 1)
        return head(self._rms(last, self.model.norm.weight))

    def step_rows(self, tokens: torch.Tensor, pos: torch.Tensor, k_pool: list, v_pool: list, rows: torch.Tensor,
                  row_range: tuple[int, int] | None, mask: torch.Tensor) -> torch.Tensor:
        """One token per row, each row at its own position (continuous batching, serve/engine.py): tokens,
        pos, rows [B]; k_pool/v_pool per layer [slots, K, len, D]; row b's key and value go to
        (rows[b], pos[b]); attention reads rows[b]'s keys 0..S-1 (S = mask.shape[1]) where mask [B, S] is
        True; row_range = (lo, hi) when rows are lo..hi-1 in order (a slice instead of a gather).
        Returns logits [B, V]."""
        H, K, D = self.H, self.K, self.D
        B, S = mask.shape
        tables = self._rope(tokens.device, S)
        c_attention = self.kernels == "c"
        if not c_attention:
            cos, sin = tables[0][pos][:, None], tables[1][pos][:, None]  # [B, 1, D]
            attn_mask = mask[:, None, None, :]
        x = self.model.tok_embeddings.weight.index_select(0, tokens)
        nqk = (H + K) * D
        sdpa = torch.nn.functional.scaled_dot_product_attention
        layers, mm, addmm, glu, head = self._ops(B)
        for i, (wn1, wqkv, wo, wn2, w13, w2) in enumerate(layers):
            qkv = mm(self._rms(x, wn1), wqkv)
            kc, vc = k_pool[i], v_pool[i]
            if c_attention:  # the mask is implied: row b sees its slot's keys 0..pos[b]
                y = self._attend_c(qkv, kc, vc, rows, pos, 0, tables)
            else:
                qk = qkv[:, :nqk].view(B, H + K, D)
                qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)
                kc[rows, :, pos] = qk[:, H:]
                vc[rows, :, pos] = qkv[:, nqk:].view(B, K, D)
                if row_range is not None:
                    keys, values = kc[row_range[0]:row_range[1], :, :S], vc[row_range[0]:row_range[1], :, :S]
                else:
                    keys, values = kc[rows, :, :S], vc[rows, :, :S]
                y = sdpa(qk[:, :H, None], keys, values, attn_mask=attn_mask, enable_gqa=K != H)
            x = self._out_ffn(x, y.reshape(B, H * D), wo, wn2, w13, w2, addmm, glu)
        return head(self._rms(x, self.model.norm.weight))


# Below this many bytes of weights a CPU decode step runs on one thread (decode_threads' auto rule).
SMALL_MODEL_BYTES = 64 << 20


def decode_threads(model, threads: int = 0) -> int:
    """Intra-op threads for generation (the prefill and the decode steps): `threads` when > 0; else (auto) 1
    on the CPU for a model whose weights are under SMALL_MODEL_BYTES, torch's current count otherwise (and
    on GPUs). Why: a decode step of a small model is ~80 ops of a few microseconds each, and with 2 threads
    every matmul and attention call becomes an OpenMP parallel region whose hand-off costs more than the
    split saves; on a loaded machine it is catastrophic (the demo model, 2 cores shared with other jobs: 93
    vs 1,589 tokens per CPU-second, 2 threads vs 1). The prefill runs on the same count: a 2-thread prefill
    left libgomp's worker spinning into the 1-thread decode (2x slower there). A large model's step is
    memory-bound matmuls, where a second core adds bandwidth."""
    if threads > 0:
        return threads
    w = model.tok_embeddings.weight
    if w.device.type != "cpu":
        return torch.get_num_threads()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 1 if nbytes < SMALL_MODEL_BYTES else torch.get_num_threads()


class num_threads:
    """`with num_threads(n):` torch's intra-op thread count set to n inside (n <= 0: left as it is),
    restored after (process-wide: the caller is the only thread computing)."""

    def __init__(self, n: int):
        self.old = torch.get_num_threads()
        self.n = n if n > 0 else self.old

    def __enter__(self):
        if self.n != self.old:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)
        return False


@torch.inference_mode()
def generate(model, input_ids: list[list[int]], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_id: int | list[int] | None = None, should_stop: Callable[[int, list[int]], bool] | None = None,
             on_token: Callable[[int, int], None] | None = None, generator: torch.Generator | None = None,
             pad_id: int = 0, vocab_limit: int | None = None, decode: str = "plain",
             threads: int = 0, batched_matmul: str = "auto", kernels: str = "auto") -> list[list[int]]:
    """Continue each prompt in one batch; returns the new tokens of each row (without the EOS that ended
    it). A row finishes at eos_id, when should_stop(row, new_tokens) is true (stop strings), or after
    max_new_tokens; generation ends when every row has finished. on_token(row, token) is called for each
    new token of an unfinished row (streaming). Prompts of different lengths are left-padded with pad_id
    and masked, and each row gets the RoPE positions it would have alone, so the result per row equals
    generating it by itself (up to floating-point reduction order). vocab_limit: ids from there on are never
    sampled (a model whose vocabulary is padded past its tokenizer's). decode: "plain" runs every step through
    the model's forward (the reference); "fast" through FastDecode (same tokens, fewer ops per step) when
    no row is padded (its prefill too, where FastDecode.prefills; batched_matmul, kernels: see FastDecode). threads:
    intra-op threads for the prefill and the decode steps (decode_threads; 0 =
    auto: one for a small model on the CPU), torch's count restored after."""
    if not input_ids or any(len(p) == 0 for p in input_ids):
        raise UserError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in input_ids]
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    V = model.cfg.vocab_size
    if any(t < 0 or t >= V for p in input_ids for t in p):
        bad = next(t for p in input_ids for t in p if t < 0 or t >= V)
        raise UserError(f"prompt token id {bad} is outside the model's vocabulary of {V}; the tokenizer does not "
                        f"belong to this model")
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    B = len(input_ids)
    lengths = [len(p) for p in input_ids]
    P = max(lengths)
    eos = set([eos_id] if isinstance(eos_id, int) else (eos_id or []))
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(input_ids):
        idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    padded = min(lengths) != P
    # key padding mask over every position the cache will hold; None when no row is padded (fast path)
    mask = None
    if padded:
        mask = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
        for b, n in enumerate(lengths):
            mask[b, :P - n] = False
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(input_ids):
            seen[b, torch.tensor(p, device=device)] = True

    if decode not in ("plain", "fast"):
        raise UserError(f"--decode must be plain or fast, got {decode!r}")
    fast = FastDecode.for_model(model, batched_matmul, kernels) if decode == "fast" and mask is None else None
    cache = model.new_kv_cache(B, P + max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    # the prefill too: after a 2-thread prefill, libgomp's spinning worker (OMP_WAIT_POLICY unset) slowed the
    # 1-thread decode of the demo model 2x on a loaded machine (417 vs 892 tokens/s)
    threads_ctx = num_threads(decode_threads(model, threads))
    try:
        threads_ctx.__enter__()
        if fast is not None and fast.prefills:
            logits = fast.prefill(idx, 0, cache)[:, None]
        else:
            logits, _ = model(idx, kv_cache=cache, start_pos=0,
                              key_padding_mask=None if mask is None else mask[:, :P], logits_to_keep=1)
        pos = P
        for _ in range(max_new_tokens):
            step = logits[:, -1]
            if vocab_limit is not None and vocab_limit < step.shape[-1]:
                step = step.clone()
                step[:, vocab_limit:] = float("-inf")
            if seen is not None:
                step = apply_repetition_penalty(step.float(), seen, repetition_penalty)
            nxt = sample_next(step, temperature, top_k, top_p, generator)  # [B]
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t in eos:
                    done[b] = True
                    continue
                out[b].append(t)
                if on_token is not None:
                    on_token(b, t)
                if should_stop is not None and should_stop(b, out[b]):
                    done[b] = True
            if all(done) or pos == P + max_new_tokens - 1:
                break
            if fast is not None:
                logits = fast.step(nxt, pos, cache)[:, None]
            else:
                logits, _ = model(nxt[:, None], kv_cache=cache, start_pos=pos,
                                  key_padding_mask=None if mask is None else mask[:, :pos + 1], logits_to_keep=1)
            pos += 1
    finally:
        threads_ctx.__exit__(None, None, None)
        model.train(was_training)
    return out


# ---------------------------------------------------------------------- the command

def stop_ids(tok) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and, for a ChatML vocabulary, <|im_end|> (a chat
    model ends its turn there; a base model never emits it from text). generate, chat and serve stop at
    these, so `z2all generate` on an SFT checkpoint stops where `z2all chat` does."""
    vocab = tok.get_vocab()
    chatml = "<|im_start|>" in vocab and "<|im_end|>" in vocab
    return [i for i in dict.fromkeys((tok.eos_token_id, vocab.get("<|im_end|>") if chatml else None)) if i is not None]


def load_tokenizer(path: str | Path, trust_remote_code: bool | None = None, option: str = "--tokenizer"):
    """A transformers tokenizer from a local directory (no network). Trusts the directory's own Python
    tokenizer class only when its tokenizer_config.json names one (auto_map), as a local checkpoint of
    this project may (trust_remote_code=None); False never runs it. A missing directory or a damaged file
    is a UserError naming it."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{option} {path}: tokenizer directory not found; pass --tokenizer DIR (a directory "
                        f"with tokenizer.json, e.g. the output of `z2all tokenizer train`)")
    files = [f for f in ("tokenizer.json", "tokenizer_config.json") if (path / f).is_file()]
    if not files:
        raise UserError(f"{option} {path} holds no tokenizer.json or tokenizer_config.json; pass the "
                        f"tokenizer directory the model was trained with")
    parsed = {}
    for name in files:
        try:
            parsed[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except ValueError as e:  # bad JSON or bad UTF-8; OSErrors (permissions ...) reach the CLI's one line
            raise UserError(f"{path / name} is corrupt ({type(e).__name__}: {str(e)[:120]}); restore it from the "
                            f"tokenizer directory it was copied from") from None
        if not isinstance(parsed[name], dict):
            raise UserError(f"{path / name} is corrupt (not a JSON object); restore it")
    remote = trust_remote_code
    if remote is None:
        remote = "auto_map" in parsed.get("tokenizer_config.json", {}) and (path / "tokenization_z2all.py").is_file()
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=remote)
    except OSError:
        raise
    except Exception as e:  # tokenizers' Exception, ValueError, KeyError ...: a file we parsed but cannot use
        first = " ".join(str(e).split())[:200] or type(e).__name__
        named = path / "tokenizer.json" if "tokenizer.json" in files else path
        raise UserError(f"{named}: cannot load the tokenizer ({type(e).__name__}: {first}); the tokenizer "
                        f"directory is damaged or not a Hugging Face tokenizer") from None


def check_vocab_fits(tok, vocab_size: int, tok_dir: str | Path, ckpt: str | Path | None = None) -> int | None:
    """A tokenizer must not produce ids the model has no embedding for: a UserError naming both sizes when
    it is bigger than the model's vocabulary (shared by generate, export and later chat/serve). Returns the
    tokenizer's size when the model's vocabulary is larger (padded), for generate(vocab_limit=...)."""
    n = len(tok)
    where = f" of {ckpt}" if ckpt else ""
    if n > vocab_size:
        raise UserError(f"the tokenizer {tok_dir} has {n} tokens but the model{where} has a vocabulary of "
                        f"{vocab_size}: it is not the tokenizer this model was trained with; pass --tokenizer "
                        f"with the right one (training copies it to <checkpoint>/tokenizer/)")
    return n if n < vocab_size else None


def _available_memory(device: torch.device) -> int | None:
    """Free bytes where the KV cache would go: the GPU's free memory, or MemAvailable for the CPU."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def plan_memory(model, batch: int, prompt_len: int, max_new_tokens: int, device: torch.device,
                max_seq_len: int | None = None, warn=None) -> None:
    """Before allocating the KV cache: a UserError (naming --max-new-tokens, the size and how many tokens
    would fit) when it cannot fit in free memory; a note with its size when it is over 1 GB; a note when
    prompt + new tokens run past the context the model was trained on (it still generates: RoPE extends,
    but positions it never saw degrade the text)."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    total = prompt_len + max_new_tokens
    need = model.kv_cache_bytes(batch, total)
    per_pos = model.kv_cache_bytes(batch, 1)
    free = _available_memory(device)
    if free is not None and need > 0.9 * free:
        fit = max(0, int(0.9 * free) // per_pos - prompt_len)
        raise UserError(f"--max-new-tokens {max_new_tokens}: the KV cache for {batch} prompt(s) of up to "
                        f"{prompt_len} tokens + {max_new_tokens} new would need {human_bytes(need)}, and "
                        f"{device.type} has {human_bytes(free)} free; use --max-new-tokens {fit} or less "
                        f"(or fewer prompts)")
    if need > 1 << 30:
        warn(f"note: allocating a {human_bytes(need)} KV cache ({batch} x {total} positions)")
    ctx = max_seq_len or model.cfg.max_seq_len
    if total > ctx:
        warn(f"note: prompt ({prompt_len} tokens) + --max-new-tokens {max_new_tokens} = {total} is past the "
             f"model's context of {ctx} (model.max_seq_len); tokens beyond position {ctx} use positions it "
             f"never trained on and usually degrade")


class IncrementalText:
    """The text of a growing list of token ids (`ids`; append to it, then call `update`), decoding only a
    short window per call: the ids since the previous read as context, then the new ones
    (text-generation-inference's scheme), not the whole continuation every token. `text` holds whole
    characters only: ids that end in half a character (U+FFFD; a byte-level token can be part of a UTF-8
    sequence) wait for the next id, unless `final`. `lock` (optional) is held around the tokenizer calls:
    a Rust tokenizer borrowed by two threads at once can fail ("Already borrowed"). Shared by the CLI's
    streamer and the serving engine."""

    def __init__(self, tokenizer, lock=None):
        self.tok, self.lock = tokenizer, lock
        # transformers' fast-tokenizer decode is its Rust backend's decode plus an optional clean-up; where
        # neither the class nor the clean-up changes that, the backend is called directly: 0.5 vs 2.1 us a
        # call, two calls per token of every stream (a serving step of 8 rows makes 16)
        from transformers import PreTrainedTokenizerFast

        cls, base = type(tokenizer), PreTrainedTokenizerFast
        self.backend = (isinstance(tokenizer, base) and cls.decode is base.decode and cls._decode is base._decode
                        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
                        and getattr(tokenizer, "_tokenizer", None) is not None)
        self.ids: list[int] = []
        self.text = ""
        self.prefix = 0  # ids[prefix:read] were the new ids of the previous read: the next read's context
        self.read = 0

    def update(self, final: bool = False) -> str:
        """Decode what `ids` gained since the last read; append its text to `text` and return it ("" while
        it ends in half a character, unless final)."""
        if self.lock is not None:
            with self.lock:
                prefix, full = self._decode()
        else:
            prefix, full = self._decode()
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self.text += delta
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def _decode(self) -> tuple[str, str]:
        dec = self.tok._tokenizer.decode if self.backend else self.tok.decode
        return (dec(self.ids[self.prefix:self.read], skip_special_tokens=True),
                dec(self.ids[self.prefix:], skip_special_tokens=True))


class _Streamer:
    """Prints one row's text as it grows (IncrementalText), holding back the last len(longest stop) - 1
    characters, which may be the start of a stop string that must not be shown."""

    def __init__(self, tokenizer, stops: list[str], stream=None):
        self.stops, self.stream = stops, stream or sys.stdout
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.inc = IncrementalText(tokenizer)
        self.ids = self.inc.ids
        self.printed = 0

    @property
    def text(self) -> str:
        return self.inc.text

    def _emit(self, upto: int) -> None:
        if upto > self.printed:
            self.stream.write(self.text[self.printed:upto])
            self.stream.flush()
            self.printed = upto

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        if not self.inc.update():
            return
        cut = len(cut_at_stop(self.text, self.stops))
        self._emit(cut if cut < len(self.text) else len(self.text) - self.hold)

    def finish(self) -> None:
        if self.ids:
            self.inc.update(final=True)
            self._emit(len(cut_at_stop(self.text, self.stops)))
        self.stream.write("\n")
        self.stream.flush()


def _stop_checker(tokenizer, stops: list[str]):
    # decode only a tail: a stop string cannot span more tokens than it has characters (+ a margin for
    # tokens that are partial characters)
    tail = max((len(s) for s in stops), default=0) + 8

    def should_stop(row: int, new: list[int]) -> bool:
        text = tokenizer.decode(new[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops)

    return should_stop


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint directory (model.safetensors + model_config.json [+ tokenizer/]), a run "
                    "directory (its latest checkpoint) or a `z2all export hf` directory")
    prompt: str = opt("", "the prompt (one); use --prompt-file for a batch")
    prompt_file: str = opt("", "text file with one prompt per line, generated together as one batch "
                           "(blank lines skipped; \\n inside a line stands for a newline)")
    max_new_tokens: int = opt(128, "tokens to generate per prompt at most (>= 1; past the model's max_seq_len "
                              "it warns, past free memory it refuses)")
    temperature: float = opt(0.8, "sampling temperature; 0 = greedy")
    top_k: int = opt(0, "sample from the k most likely tokens only; 0 = off")
    top_p: float = opt(0.95, "nucleus sampling: the smallest set of tokens with probability >= p; 1 = off")
    repetition_penalty: float = opt(1.0, "penalise tokens already in the prompt or output (CTRL, as transformers: "
                                    "positive logits / p, negative * p); 1 = off")
    stop: list[str] = opt(help="stop strings (comma separated): a row ends when its text contains one",
                          factory=list)
    seed: int = opt(1234, "random seed for sampling")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "compute dtype: auto = bf16/fp16 on GPU, fp32 on CPU",
                     choices=("auto", "fp32", "bf16", "fp16"))
    tokenizer: str = opt("", "tokenizer directory (default: <ckpt>/tokenizer/)")
    decode: str = opt("fast", "decode step: fast (FastDecode: fused projections, fewer ops per token) or plain "
                      "(the model's forward, the reference); both give the same tokens", choices=("fast", "plain"))
    decode_threads: int = opt(0, "CPU threads for generating (prefill and decode steps); 0 = auto: 1 for a model "
                              "under 64 MB of weights (per-op threading costs more than it saves there), torch's "
                              "default otherwise")
    batched_matmul: str = opt("auto", "with --decode-kernels torch: the matrix "
                              "multiplies of the prompt prefill and of decode steps with several rows: onednn (packed "
                              "weights, AVX-512 on any x86 CPU), blas (torch.mm: MKL), auto = onednn on an x86 CPU in "
                              "fp32, else blas", choices=BATCHED_MATMULS)
    decode_kernels: str = opt("auto", "a decode step's RMSNorm, its RoPE, cache write and attention, and its matrix "
                              "multiplies: c (the compiled z2all.model._decodec), torch (the reference ops), auto "
                              "= c for an fp32 model on the CPU when it is built",
                              choices=KERNELS)


def _prompts(cfg: Config) -> list[str]:
    prompts = [cfg.prompt] if cfg.prompt else []
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path}: {'is a directory' if path.is_dir() else 'no such file'}; "
                            f"give a text file with one prompt per line")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise UserError(f"--prompt-file {path}: line {line} is not UTF-8 (byte {e.start}); save the file as "
                            f"UTF-8") from None
        lines = text.splitlines()
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        if cfg.prompt_file:
            raise UserError(f"--prompt-file {cfg.prompt_file} holds no prompt (every line is blank)")
        raise UserError("give a prompt: --prompt TEXT or --prompt-file FILE")
    return prompts


def run(cfg: Config) -> int:
    from z2all.model.hf_compat import default_tokenizer_dir, load_checkpoint
    from z2all.model.llama import resolve_checkpoint

    check_sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens)
    if cfg.decode_threads < 0:
        raise UserError(f"--decode-threads must be >= 0 (0 = auto), got {cfg.decode_threads}")
    prompts = _prompts(cfg)
    ckpt, kind, _ = resolve_checkpoint(cfg.ckpt, "--ckpt")  # a bad --ckpt is named before the tokenizer
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_dir(ckpt, kind)
    if not cfg.tokenizer and not tok_dir.is_dir():
        raise UserError(f"--ckpt {ckpt} has no tokenizer/ next to its weights; pass --tokenizer DIR (the tokenizer "
                        f"the model was trained with)")
    tok = load_tokenizer(tok_dir)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model, ckpt, kind, note = load_checkpoint(cfg.ckpt, map_location=device)
    if note:
        print(note, file=sys.stderr, flush=True)
    model = model.to(pick_dtype(cfg.dtype, device))
    vocab_limit = check_vocab_fits(tok, model.cfg.vocab_size, tok_dir, ckpt)
    ids = []
    for p in prompts:
        enc = tok(p, add_special_tokens=True)["input_ids"]
        if not enc:
            raise UserError(f"prompt {p!r} encodes to no tokens")
        ids.append(enc)
    plan_memory(model, len(ids), max(len(i) for i in ids), cfg.max_new_tokens, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    streamer = _Streamer(tok, cfg.stop) if len(prompts) == 1 else None
    if streamer is not None:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    out = generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                   top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, eos_id=stop_ids(tok),
                   should_stop=_stop_checker(tok, cfg.stop) if cfg.stop else None, on_token=streamer,
                   generator=gen, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                   vocab_limit=vocab_limit, decode=cfg.decode,
                   threads=cfg.decode_threads, batched_matmul=cfg.batched_matmul, kernels=cfg.decode_kernels)
    if streamer is not None:
        streamer.finish()
        return 0
    for i, (p, new) in enumerate(zip(prompts, out)):
        text = cut_at_stop(tok.decode(new, skip_special_tokens=True), cfg.stop)
        print(f"--- [{i}] ---\n{p}{text}")
    return 0
