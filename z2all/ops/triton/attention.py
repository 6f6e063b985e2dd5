"""Flash attention (FlashAttention-2 structure) forward and backward in Triton: causal or not, GQA, any head
dim up to 256 (64 and 128 are the tuned ones; 16/32 run in the CPU tests), never materialising [T, S].

Notation: q [B,H,T,D], k/v [B,K,S,D], head h reads kv head h // (H/K). Causal masks are aligned bottom-right:
query i sits at position S - T + i and sees keys j <= S - T + i (so T < S is KV-cache decoding; rows that see
no key at all output 0). Scores work in base 2: x = q.k * log2(e)/sqrt(D), so softmax(q.k/sqrt(D)) = 2^(x - L)
with L = log2 sum_j 2^x_j (the log-sum-exp the forward saves, fp32 [B,H,T]).

Forward, one program per (block of BLOCK_M queries, batch*head); online softmax over key blocks:

    m, l, acc = -inf, 0, 0
    for each key block:  x = q k^T * scale2 (masked -> -inf);  m' = max(m, rowmax x)
                         p = 2^(x - m');  l = l 2^(m - m') + rowsum p;  acc = acc 2^(m - m') + p v;  m = m'
    o = acc / l,   L = m + log2 l

Key blocks are split into the ones every query row of the block fully sees (no mask arithmetic) and the
diagonal/tail ones (masked); blocks entirely above the diagonal are never visited, halving causal work.

Backward recomputes P from (q, k, L) instead of storing it (the FlashAttention-2 recompute):

    delta_i = sum_d dO_id O_id                      (preprocess kernel, fp32 [B,H,T])
    P  = 2^(x - L)            dV = P^T dO           dP = dO V^T
    dS = P * (dP - delta)     dQ = dS K / sqrt(D)   dK = dS^T Q / sqrt(D)

split into two kernels so neither needs atomics (deterministic, and no fp32 scratch for dQ):
  * dK/dV: one program per (key block, batch*kv head); it loops over the H/K query heads of its group and
    over the query blocks at or below the diagonal, accumulating dK and dV in fp32 registers (GQA's sum over
    the group happens here, not in a separate reduction);
  * dQ: one program per (query block, batch*head), looping over key blocks up to the diagonal.
Causal work per block is triangular: the forward and dQ launch their heaviest (last) query blocks first,
while dK/dV's first key blocks are already its heaviest (every later query sees them).
The price of no atomics: dQ's kernel recomputes x and dP, so the backward does 7 block matmuls where
FlashAttention-2 (atomic fp32 dQ) does 5; forward+backward is 9 units against 7.

The second backward (`attention_atomic_dq`, chosen by `--model.ops.attention_bwd=atomic`) is that
FlashAttention-2 layout: the dK/dV kernel's loop also computes each query block's dQ share dS K (the 5th
matmul) and adds it with fp32 atomics into a zeroed [B,H,T,D] fp32 buffer, cast to the input dtype at the
end. It saves dQ's recomputation at the price of atomic traffic and run-to-run variation in dQ's last bits
(the order of the adds). `z2all bench kernels` times both rows on a GPU.

All matmuls (tl.dot) take the input dtype (tensor cores for bf16/fp16; full fp32 for fp32 inputs) and
accumulate in fp32; P and dS are cast to the input dtype before their matmuls, as FlashAttention does.
Inputs are read through their strides (q from `view(B,T,H,D).transpose(1,2)` needs no copy); outputs are
contiguous. Block sizes are autotuned on the GPU per (power-of-two bucket of T and of S, D, causal, GQA group);
the interpreter runs one 16x16 config; Z2ALL_TRITON_AUTOTUNE=0 keeps the first (default) GPU config.

Packed rows (segment_ids [B, T], T == S; `z2all sft` packs examples into rows): query i attends key j only
when their ids are equal (and j <= i when causal), the block-diagonal mask of reference.attention_naive. The
SEGMENTS variant of every kernel loads the ids of its row/column block and adds `seg_q == seg_k` to the mask,
and visits only the blocks that can share a segment: `_segment_bounds` gives, per position, the first and
last position of its id (one sort, no host sync) and the start/end of its run of equal ids. A query block
visits keys [min first, min(causal end, max last + 1)) -- for contiguous examples, its first example's start
to its own end -- instead of [0, end); a key block of dK/dV the query rows [max(its start, first), max last
+ 1). Inside that range, blocks lying in the run of every row of the block (and below the diagonal) take
the unmasked path, as in plain causal attention; the rest are masked. Every row sees at least itself, so no
row is empty. Any ids give the reference's result (an id reused in two runs is bounded by its first and
last occurrence); contiguous examples are what the skipping is for.

key_padding_mask (only batched generation with left padding uses it) falls back to reference.attention_sdpa:
a padding mask in the kernels would add a load and a compare to every block of every training step for a
path that never needs gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from z2all.ops import reference
from z2all.ops.triton import autotune_configs, check_device, dot_precision

LOG2E = 1.4426950408889634


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_CPU_CFG = _cfg(16, 16, 1, 1)
# 16-bit search spaces, the first entry being the default when autotuning is off. Kept small (3-4 each): every
# config costs one compile (~5-10 s for these kernels) per new shape bucket. Configs that do not fit in shared
# memory for a head dim are skipped by the autotuner. The bwd shapes follow the split FlashAttention-2 layout:
# tall key blocks for dK/dV (each program owns BLOCK_N keys), tall query blocks for dQ.
_FWD_16 = [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)]
_DKDV_16 = [_cfg(32, 128, 4, 3), _cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2)]
_DQ_16 = [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2)]
# fp32 (tests, debugging): one small config. Full-precision fp32 dots at 128x64 take ptxas minutes to build.
_FWD_32, _DKDV_32, _DQ_32 = [_cfg(32, 32, 4, 1)], [_cfg(32, 32, 4, 1)], [_cfg(32, 32, 4, 1)]
# the atomic-dQ backward (attention_bwd=atomic): dK/dV's layout (tall key blocks) plus a [BLOCK_M, D] fp32 dQ
# tile per step, so smaller query blocks than the split dK/dV kernel may tune best
_ATOMIC_16 = [_cfg(32, 128, 4, 2), _cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2)]
_ATOMIC_32 = [_cfg(32, 32, 4, 1)]


def _by_dtype(fp32_configs):
    """early_config_prune: fp32 inputs get their own config list, 16-bit inputs the rest."""
    def prune(configs, named_args, **kwargs):
        is32 = named_args["Q"].dtype == torch.float32
        kept = [c for c in configs if any(c is f for f in fp32_configs) == is32]
        return kept or configs[:1]
    return {"early_config_prune": prune}


_FWD_CONFIGS = autotune_configs(_FWD_16, _CPU_CFG, _FWD_32)
_BWD_KV_CONFIGS = autotune_configs(_DKDV_16, _CPU_CFG, _DKDV_32)
_BWD_Q_CONFIGS = autotune_configs(_DQ_16, _CPU_CFG, _DQ_32)
_BWD_ATOMIC_CONFIGS = autotune_configs(_ATOMIC_16, _CPU_CFG, _ATOMIC_32)
# Autotuning is keyed on power-of-two buckets of T and S (TUNE_T/TUNE_S, unused inside the kernels), not on
# T and S themselves: KV-cache decoding changes S every step and would otherwise re-tune every token.
_KEY = ["TUNE_T", "TUNE_S", "HEAD_DIM", "CAUSAL", "GROUP", "SEGMENTS"]
# Triton would otherwise compile a variant per (x % 16 == 0, x == 1) pattern of every int argument; sizes vary
# from call to call (and GROUP is a runtime int for the same reason), strides stay specialised (alignment).
_NO_SPECIALIZE = ["H", "T", "S", "TUNE_T", "TUNE_S", "GROUP"]


@triton.jit
def _heavy_first(CAUSAL: tl.constexpr):
    """Query-block index of this program. Causal query blocks further down see more keys (block i visits
    i + 1 key blocks), and the GPU starts programs in launch order: handing the last, heaviest blocks to the
    first programs lets the light ones fill the tail of the wave instead of one heavy block running alone."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _query_block(Q, sqb, sqh, sqt, sqd, H, T, GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a program of the forward or dQ grid (query block, batch*head) works on: (bh, b, h, kv head,
    first row m0, row offsets, head-dim offsets, the rows' mask, its q block [BLOCK_M, BLOCK_D])."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    m0 = _heavy_first(CAUSAL) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    return bh, b, h, h // GROUP, m0, offs_m, offs_d, q_mask, q


@triton.jit
def _key_split(m0, S, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of the query block starting at row m0: [0, full_end) holds the key blocks every row sees in
    full (no mask needed), [full_end, hi) the diagonal/tail blocks that need the causal or length mask."""
    if CAUSAL:
        full_end = tl.maximum(tl.minimum(S, m0 + (S - T) + 1), 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(S, m0 + BLOCK_M + (S - T))
    else:
        full_end = S // BLOCK_N * BLOCK_N
        hi = S
    return full_end, hi


@triton.jit
def _same_segment(seg_q, seg_row, offs_n, S):
    """[BLOCK_M, BLOCK_N]: query row and key share a segment (seg_q: the rows' ids; keys past S never do)."""
    seg_k = tl.load(seg_row + offs_n, mask=offs_n < S, other=-1)
    return (seg_q[:, None] == seg_k[None, :]) & (offs_n[None, :] < S)


@triton.jit
def _segment_split(SEG, BOUNDS, b, offs, T, full_end, hi, BLOCK: tl.constexpr):
    """Ranges of the other axis for the positions `offs` of packed row b (BOUNDS: _segment_bounds' [B, 4, T]).
    Returns their segment ids (-1 past T) and lo <= full_lo <= full_end <= hi, multiples of BLOCK except hi:
    [lo, hi) holds everything that can share a segment with one of them (their segments' first position ..
    last position + 1, capped by the causal/length bound `hi`); [full_lo, full_end) only positions inside
    the runs of ALL of them (the same segment for sure: no segment mask needed; capped by the caller's
    unmasked bound `full_end`). Outside [full_lo, full_end) blocks need the segment mask."""
    ok = offs < T
    base = BOUNDS + b * 4 * T + offs
    seg = tl.load(SEG + b * T + offs, mask=ok, other=-1)
    lo = tl.min(tl.load(base, mask=ok, other=T), axis=0) // BLOCK * BLOCK
    hi = tl.minimum(tl.max(tl.load(base + T, mask=ok, other=0), axis=0), hi)
    full_lo = tl.cdiv(tl.max(tl.load(base + 2 * T, mask=ok, other=0), axis=0), BLOCK) * BLOCK
    full_end = tl.minimum(tl.min(tl.load(base + 3 * T, mask=ok, other=T), axis=0) // BLOCK * BLOCK, full_end)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_end = tl.minimum(tl.maximum(full_end, full_lo), hi)
    return seg, lo, full_lo, full_end, hi


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, n0, S, T, skn, skd, svn, svd, qk_scale,
               seg_q, seg_row, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr, SEGMENTS: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_DIM
    if MASKED:
        kv_mask = (offs_n[:, None] < S) & dmask[None, :]
    else:
        kv_mask = dmask[None, :]
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    x = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        keep = offs_n[None, :] < S
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + (S - T))
        if SEGMENTS:
            keep = keep & _same_segment(seg_q, seg_row, offs_n, S)
        x = tl.where(keep, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: avoid inf - inf
    p = tl.math.exp2(x - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by=_by_dtype(_FWD_32))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(Q, K, V, O, L, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
              sob, soh, sot, H, T, S, qk_scale, TUNE_T, TUNE_S, GROUP, HEAD_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, SEGMENTS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, b, h, kvh, m0, offs_m, offs_d, q_mask, q = _query_block(Q, sqb, sqh, sqt, sqd, H, T, GROUP, HEAD_DIM,
                                                                CAUSAL, BLOCK_D, BLOCK_M)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full_end, hi = _key_split(m0, S, T, CAUSAL, BLOCK_M, BLOCK_N)
    if SEGMENTS:  # packed rows: from the rows' first segment start on, masked until every row's run is in
        seg_q, lo, full_lo, full_end, hi = _segment_split(SEG, BOUNDS, b, offs_m, T, full_end, hi, BLOCK_N)
        for n0 in range(lo, full_lo, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, n0, S, T, skn, skd, svn,
                                       svd, qk_scale, seg_q, SEG + b * T, True, CAUSAL, HEAD_DIM, BLOCK_N, PREC,
                                       True)
    else:
        seg_q = offs_m
        full_lo = 0
    for n0 in range(full_lo, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, n0, S, T, skn, skd, svn,
                                   svd, qk_scale, seg_q, SEG + b * T, False, CAUSAL, HEAD_DIM, BLOCK_N, PREC, False)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, n0, S, T, skn, skd, svn,
                                   svd, qk_scale, seg_q, SEG + b * T, True, CAUSAL, HEAD_DIM, BLOCK_N, PREC,
                                   SEGMENTS)
    empty = l_i == 0.0  # a causal row above the diagonal (T > S): output 0, L = +inf so backward's P = 0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(L + bh * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, sdod, H, T,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, l_row, delta_row, offs_n, offs_d, m0, T, S, sqt, sqd, sdot, sdod,
                qk_scale, dq_base, dq_scale, seg_k, seg_row, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, SEGMENTS: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
    lse = tl.load(l_row + offs_m, mask=offs_m < T, other=float("inf"))  # +inf: padded rows get P = 0
    delta = tl.load(delta_row + offs_m, mask=offs_m < T, other=0.0)
    xT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    pT = tl.math.exp2(xT - lse[None, :])
    if MASKED:  # causal diagonal block (keys past S need no mask: their rows of dK/dV are never stored)
        pT = tl.where(offs_n[:, None] <= offs_m[None, :] + (S - T), pT, 0.0)
    if SEGMENTS:  # packed rows: only the query rows of the keys' own segments (padded rows already have P = 0)
        seg_q = tl.load(seg_row + offs_m, mask=offs_m < T, other=-1)
        pT = tl.where(seg_k[:, None] == seg_q[None, :], pT, 0.0)
    if ATOMIC_DQ:  # keys past S do reach dQ here: zero them (their k rows are 0, but 2^(0 - L) may overflow)
        pT = tl.where(offs_n[:, None] < S, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    if ATOMIC_DQ:  # the 5th matmul: this key block's share of dQ, added into the fp32 dQ of these query rows
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * dq_scale  # [BLOCK_M, BLOCK_D]
        tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=q_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(Q, K, V, DO, L, DELTA, DK, DV, DQ, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn, skd,
                  svb, svh, svn, svd, sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkn, H, KH, T, S, qk_scale, sm_scale,
                  GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, SEGMENTS: tl.constexpr):
    """One key block of one (batch, kv head): dK and dV over every query block that sees it, and with
    ATOMIC_DQ also each query block's dQ share (DQ: contiguous fp32 [B, H, T, HEAD_DIM], zeroed)."""
    pid_n = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    b = bk // KH
    kvh = bk % KH
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if SEGMENTS:
        # packed rows (T == S): the query rows of these keys' segments [m_seg, m_seg_end), from the diagonal
        # when causal; no mask for [m_seg_full, m_seg_full_end): rows in the run of every key, below the block
        seg_k, m_seg, m_seg_full, m_seg_full_end, m_seg_end = _segment_split(SEG, BOUNDS, b, offs_n, T, T, T,
                                                                             BLOCK_M)
        if CAUSAL:
            m_seg = tl.maximum(m_seg, n0 // BLOCK_M * BLOCK_M)
            m_seg_full = tl.minimum(tl.maximum(m_seg_full, tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M), m_seg_end)
            m_seg_full_end = tl.maximum(m_seg_full_end, m_seg_full)
    else:
        seg_k = offs_n
    if CAUSAL:
        # query rows from n0 - (S - T) on see key n0 (start at that row's block); from
        # n0 + BLOCK_N - 1 - (S - T) on they see the whole key block (no mask from that block on)
        m_start = tl.maximum(n0 - (S - T), 0) // BLOCK_M * BLOCK_M
        m_full = tl.maximum(tl.cdiv(n0 + BLOCK_N - 1 - (S - T), BLOCK_M) * BLOCK_M, m_start)
        m_masked_end = tl.minimum(m_full, T)
    else:
        m_full = 0
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        l_row = L + (b * H + h) * T
        delta_row = DELTA + (b * H + h) * T
        dq_base = DQ + (b * H + h) * T * HEAD_DIM
        if SEGMENTS:
            for m0 in range(m_seg, m_seg_full, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, l_row, delta_row, offs_n, offs_d, m0, T, S,
                                     sqt, sqd, sdot, sdod, qk_scale, dq_base, sm_scale, seg_k, SEG + b * T, CAUSAL,
                                     HEAD_DIM, BLOCK_M, PREC, ATOMIC_DQ, True)
            for m0 in range(m_seg_full, m_seg_full_end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, l_row, delta_row, offs_n, offs_d, m0, T, S,
                                     sqt, sqd, sdot, sdod, qk_scale, dq_base, sm_scale, seg_k, SEG, False,
                                     HEAD_DIM, BLOCK_M, PREC, ATOMIC_DQ, False)
            for m0 in range(m_seg_full_end, m_seg_end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, l_row, delta_row, offs_n, offs_d, m0, T, S,
                                     sqt, sqd, sdot, sdod, qk_scale, dq_base, sm_scale, seg_k, SEG + b * T, CAUSAL,
                                     HEAD_DIM, BLOCK_M, PREC, ATOMIC_DQ, True)
        else:
            if CAUSAL:
                for m0 in range(m_start, m_masked_end, BLOCK_M):
                    dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, l_row, delta_row, offs_n, offs_d, m0, T,
                                         S, sqt, sqd, sdot, sdod, qk_scale, dq_base, sm_scale, seg_k, SEG, True,
                                         HEAD_DIM, BLOCK_M, PREC, ATOMIC_DQ, False)
            for m0 in range(m_full, T, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, l_row, delta_row, offs_n, offs_d, m0, T, S,
                                     sqt, sqd, sdot, sdod, qk_scale, dq_base, sm_scale, seg_k, SEG, False, HEAD_DIM,
                                     BLOCK_M, PREC, ATOMIC_DQ, False)
    out = b * sdkb + kvh * sdkh + offs_n[:, None] * sdkn + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_BWD_KV_CONFIGS, key=_KEY, prune_configs_by=_by_dtype(_DKDV_32))
@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["KH"])
def _attn_bwd_dkdv(Q, K, V, DO, L, DELTA, DK, DV, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn, skd,
                   svb, svh, svn, svd, sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkn, H, KH, T, S, qk_scale, sm_scale,
                   TUNE_T, TUNE_S, GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr, SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _dkdv_program(Q, K, V, DO, L, DELTA, DK, DV, L, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn, skd,
                  svb, svh, svn, svd, sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkn, H, KH, T, S, qk_scale, sm_scale,
                  GROUP, HEAD_DIM, CAUSAL, BLOCK_D, PREC, BLOCK_M, BLOCK_N, False, SEGMENTS)


# reset_to_zero: the autotuner runs every config on the real arguments, and each run adds into DQ
@triton.autotune(configs=_BWD_ATOMIC_CONFIGS, key=_KEY, prune_configs_by=_by_dtype(_ATOMIC_32),
                 reset_to_zero=["DQ"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["KH"])
def _attn_bwd_atomic(Q, K, V, DO, L, DELTA, DK, DV, DQ, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn,
                     skd, svb, svh, svn, svd, sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkn, H, KH, T, S, qk_scale,
                     sm_scale, TUNE_T, TUNE_S, GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr, SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    _dkdv_program(Q, K, V, DO, L, DELTA, DK, DV, DQ, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn, skd,
                  svb, svh, svn, svd, sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkn, H, KH, T, S, qk_scale, sm_scale,
                  GROUP, HEAD_DIM, CAUSAL, BLOCK_D, PREC, BLOCK_M, BLOCK_N, True, SEGMENTS)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, n0, T, S, skn, skd, svn, svd, qk_scale,
              seg_q, seg_row, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, PREC: tl.constexpr, SEGMENTS: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    else:
        kv_mask = offs_d[None, :] < HEAD_DIM
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    x = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(x - lse[:, None])
    if MASKED:
        keep = offs_n[None, :] < S
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + (S - T))
        if SEGMENTS:
            keep = keep & _same_segment(seg_q, seg_row, offs_n, S)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.autotune(configs=_BWD_Q_CONFIGS, key=_KEY, prune_configs_by=_by_dtype(_DQ_32))
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, L, DELTA, DQ, SEG, BOUNDS, sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh,
                 svn, svd, sdob, sdoh, sdot, sdod, sdqb, sdqh, sdqt, H, T, S, qk_scale, sm_scale, TUNE_T, TUNE_S,
                 GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr, SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, b, h, kvh, m0, offs_m, offs_d, q_mask, q = _query_block(Q, sqb, sqh, sqt, sqd, H, T, GROUP, HEAD_DIM,
                                                                CAUSAL, BLOCK_D, BLOCK_M)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
    lse = tl.load(L + bh * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full_end, hi = _key_split(m0, S, T, CAUSAL, BLOCK_M, BLOCK_N)  # the same split as the forward
    if SEGMENTS:
        seg_q, lo, full_lo, full_end, hi = _segment_split(SEG, BOUNDS, b, offs_m, T, full_end, hi, BLOCK_N)
        for n0 in range(lo, full_lo, BLOCK_N):
            dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, n0, T, S, skn, skd, svn, svd,
                           qk_scale, seg_q, SEG + b * T, True, CAUSAL, HEAD_DIM, BLOCK_N, PREC, True)
    else:
        seg_q = offs_m
        full_lo = 0
    for n0 in range(full_lo, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, n0, T, S, skn, skd, svn, svd,
                       qk_scale, seg_q, SEG + b * T, False, CAUSAL, HEAD_DIM, BLOCK_N, PREC, False)
    for n0 in range(full_end, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, n0, T, S, skn, skd, svn, svd,
                       qk_scale, seg_q, SEG + b * T, True, CAUSAL, HEAD_DIM, BLOCK_N, PREC, SEGMENTS)
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _grid_m(T, BH):
    return lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), BH)


def _tune_key(T: int, S: int) -> tuple[int, int]:
    return triton.next_power_of_2(T), triton.next_power_of_2(S)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 on every dimension


def _segment_bounds(seg: torch.Tensor) -> torch.Tensor:
    """The kernels' loop bounds for segment ids [B, T] int32, as int32 [B, 4, T]: per position, the first
    position and the last position + 1 of its id in the row (what can attend it at all), and the start and
    end of its run of equal ids (what surely attends it: blocks inside every row's run skip the mask). An id
    may occur in several runs (first/last occurrence bound it; the mask still compares ids, so any ids give
    the reference's result); packed rows, one run per example, skip the most. A few device ops, no sync."""
    B, T = seg.shape
    pos = torch.arange(T, device=seg.device).expand(B, T)

    def firsts_lasts(ids):  # per position of the sorted/unsorted row: index of its group's first and last + 1
        new = torch.ones_like(ids, dtype=torch.bool)
        new[:, 1:] = ids[:, 1:] != ids[:, :-1]
        end = torch.ones_like(new)
        end[:, :-1] = new[:, 1:]
        first = torch.where(new, pos, 0).cummax(dim=1).values
        last = torch.where(end, pos, T).flip(1).cummin(dim=1).values.flip(1)
        return first, last

    ids, perm = torch.sort(seg, dim=1, stable=True)
    first_at, last_at = firsts_lasts(ids)  # within the sorted row; stable: a group's first = its least position
    out = torch.empty((B, 4, T), dtype=torch.int32, device=seg.device)
    out[:, 0].scatter_(1, perm, perm.gather(1, first_at).to(torch.int32))
    out[:, 1].scatter_(1, perm, perm.gather(1, last_at).to(torch.int32) + 1)
    run_start, run_last = firsts_lasts(seg)
    out[:, 2], out[:, 3] = run_start, run_last + 1
    return out


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, atomic_dq: bool, seg=None):
        B, H, T, D = q.shape
        KH, S = k.shape[1], k.shape[2]
        o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        sm_scale = 1.0 / math.sqrt(D)
        segs = (seg, _segment_bounds(seg)) if seg is not None and o.numel() else (lse, lse)
        common = dict(GROUP=H // KH, HEAD_DIM=D, CAUSAL=causal, BLOCK_D=_block_d(D), PREC=dot_precision(q.dtype),
                      SEGMENTS=seg is not None)
        if o.numel():
            _attn_fwd[_grid_m(T, B * H)](q, k, v, o, lse, *segs, *q.stride(), *k.stride(), *v.stride(),
                                        *o.stride()[:3], H, T, S, sm_scale * LOG2E, *_tune_key(T, S), **common)
        ctx.save_for_backward(q, k, v, o, lse, *segs)
        ctx.causal, ctx.atomic_dq, ctx.segments = causal, atomic_dq, seg is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *segs = ctx.saved_tensors
        B, H, T, D = q.shape
        KH, S = k.shape[1], k.shape[2]
        sm_scale = 1.0 / math.sqrt(D)
        block_d = _block_d(D)
        common = dict(GROUP=H // KH, HEAD_DIM=D, CAUSAL=ctx.causal, BLOCK_D=block_d, PREC=dot_precision(q.dtype),
                      SEGMENTS=ctx.segments)
        dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, KH, S, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, KH, S, D), dtype=v.dtype, device=v.device)
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), None, None, None
        delta = torch.empty_like(lse)
        block_m = 64 if q.is_cuda else 16
        _attn_bwd_delta[(triton.cdiv(T, block_m), B * H)](o, do, delta, *o.stride()[:3], *do.stride(), H, T,
                                                           HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m)
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        grid_n = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * KH)
        if ctx.atomic_dq:
            dq32 = torch.zeros((B, H, T, D), dtype=torch.float32, device=q.device)
            _attn_bwd_atomic[grid_n](q, k, v, do, lse, delta, dk, dv, dq32, *segs, *strides, *dk.stride()[:3], H,
                                     KH, T, S, sm_scale * LOG2E, sm_scale, *_tune_key(T, S), **common)
            return dq32.to(q.dtype), dk, dv, None, None, None
        _attn_bwd_dkdv[grid_n](q, k, v, do, lse, delta, dk, dv, *segs, *strides, *dk.stride()[:3], H, KH, T, S,
                               sm_scale * LOG2E, sm_scale, *_tune_key(T, S), **common)
        _attn_bwd_dq[_grid_m(T, B * H)](q, k, v, do, lse, delta, dq, *segs, *strides, *dq.stride()[:3], H, T, S,
                                        sm_scale * LOG2E, sm_scale, *_tune_key(T, S), **common)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              key_padding_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q[B,H,T,D], k/v[B,K,S,D] (see reference.attention_naive).
    segment_ids [B, T] (T == S, packed rows): a query attends only keys of its own segment (the varlen kernel).
    With a key_padding_mask this calls reference.attention_sdpa (generation only; see the module doc).
    Backward: the split dK/dV + dQ kernels (deterministic)."""
    return _attention(q, k, v, causal, key_padding_mask, segment_ids, atomic_dq=False)


def attention_atomic_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        key_padding_mask: torch.Tensor | None = None,
                        segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`attention` with the FlashAttention-2 backward: one kernel, dQ accumulated with fp32 atomic adds
    (5 block matmuls instead of 7; the order of the adds, hence dQ's last bits, varies from run to run)."""
    return _attention(q, k, v, causal, key_padding_mask, segment_ids, atomic_dq=True)


def _attention(q, k, v, causal, key_padding_mask, segment_ids, atomic_dq: bool) -> torch.Tensor:
    if key_padding_mask is not None:
        return reference.attention_sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                        segment_ids=segment_ids)
    B, H, T, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or v.shape != k.shape or H % k.shape[1]:
        raise ValueError(f"attention: want q[B,H,T,D], k/v[B,K,S,D] with H % K == 0; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if D > 256:
        raise ValueError(f"attention: head dim {D} > 256 is not supported by the Triton kernel")
    if B * H > 65535:  # the (batch*head) axis is CUDA grid dim 1 (dim 0 = query blocks keeps K/V hot in L2)
        raise ValueError(f"attention: batch * heads = {B * H} > 65535 is not supported by the Triton kernel; "
                         "use attention=sdpa")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T) or k.shape[2] != T:
            raise ValueError(f"segment_ids [B, T] needs T == S (packed training rows), got T={T}, S={k.shape[2]}, "
                             f"segment_ids {list(segment_ids.shape)}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"attention: segment_ids must be integers, got {segment_ids.dtype}")
        if segment_ids.device != q.device:
            raise ValueError(f"attention: segment_ids on {segment_ids.device}, q on {q.device}")
        segment_ids = segment_ids.to(torch.int32).contiguous()
    check_device(q, k, v)
    return _FlashAttention.apply(q, k, v, bool(causal), atomic_dq, segment_ids)
