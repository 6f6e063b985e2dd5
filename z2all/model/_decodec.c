/* z2all.model._decodec: the attention of one decode step in one call per layer, RMSNorm, and the matrix
 * multiplies of a few rows, for FastDecode (model/generate.py, `kernels="c"`; the reference is its torch
 * path: RoPE as three ops, two index_puts into the cache, scaled_dot_product_attention with a key mask;
 * torch.rms_norm; torch.mm / oneDNN's linear).
 *
 * attend(qkv, k_pool, v_pool, slots, pos, pos0, cos, sin, out, B, H, K, D, L, n_slots, n_pos)
 *   Every argument is a Python int: the first nine are the data pointers of float32 / int64 CPU tensors
 *   that the caller (FastDecode._attend_c) has checked to be contiguous, the rest are sizes.
 *   qkv     [B, (H + 2K) * D]   the step's q | k | v projections, one new token per row
 *   k_pool  [n_slots, K, L, D]  keys of every slot (the engine's pool, or a KVCache with n_slots = B)
 *   v_pool  [n_slots, K, L, D]
 *   slots   [B] int64           row b's slot; 0 (a null pointer) = slot b
 *   pos     [B] int64           row b's position; 0 (a null pointer) = every row at pos0
 *   cos/sin [n_pos, D]          FastDecode's RoPE tables: cat(cos, cos) and cat(-sin, sin)
 *   out     [B, H * D]          the attention output (heads side by side, the layout wo reads)
 * For each row b at position p in slot s: RoPE on q and k (rotate-half), k and v written at (s, p), then
 * each query head h (kv head h / (H / K)) attends causally to keys 0..p of slot s: softmax(q.k / sqrt(D)).
 * Positions and slots are checked before any write; a bad one raises ValueError. The GIL is released while
 * it computes.
 *
 * Why: in the torch path these are ~8 ops per layer whose dispatch costs more than their arithmetic at
 * decode sizes (8 rows x 4 heads x ~100 keys x 64 is ~0.4 MFLOP). The inner loops are written so GCC
 * vectorizes them (`omp simd`, -fopenmp-simd) and cloned for AVX-512 / AVX2 / baseline x86-64, picked at
 * load time (target_clones), since the extension is built without -march. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* dst[i] = x[i] * c[i] + x[(i + D/2) % D] * s[i]: rotate-half RoPE with the sign folded into s */
static inline void rope(float *restrict dst, const float *restrict x, const float *restrict c,
                        const float *restrict s, int64_t D) {
    int64_t h = D / 2;
#pragma omp simd
    for (int64_t i = 0; i < h; i++) dst[i] = x[i] * c[i] + x[i + h] * s[i];
#pragma omp simd
    for (int64_t i = h; i < D; i++) dst[i] = x[i] * c[i] + x[i - h] * s[i];
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* y += w * x */
static inline void axpy(float *restrict y, float w, const float *restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += w * x[i];
}

/* exp(x) for -87 <= x <= 88 (callers clamp): range reduction (x = k ln2 + r, |r| <= ln2/2), a degree-7
 * polynomial for exp(r) (Cephes' expf coefficients) and 2^k built in the exponent bits; ~1 ulp, and a body
 * GCC vectorizes inside an `omp simd` loop (libm's expf is a call per element). */
/* r = x - k ln2 (ln2 split in two for accuracy), then exp(r) for |r| <= ln2/2; written once for the float
 * (exp_poly) and the 16-float (exp16) forms, whose operators are the same */
#define EXP_REDUCE(x, k) ((x) - (k) * 0.693359375f + (k) * 2.12194440e-4f)
#define EXP_POLY_R(p, r)                   \
    do {                                   \
        p = (r) * 1.9875691500e-4f + 1.3981999507e-3f; \
        p = p * (r) + 8.3334519073e-3f;    \
        p = p * (r) + 4.1665795894e-2f;    \
        p = p * (r) + 1.6666665459e-1f;    \
        p = p * (r) + 5.0000001201e-1f;    \
        p = p * (r) * (r) + (r) + 1.f;     \
    } while (0)

static inline float exp_poly(float x) {
    float k = floorf(x * 1.44269504f + 0.5f);
    float r = EXP_REDUCE(x, k), p;
    EXP_POLY_R(p, r);
    union { int32_t i; float f; } two_k = {.i = ((int32_t)k + 127) << 23};
    return p * two_k.f;
}

/* w[t] = exp(w[t] - m) for t < n, returning their sum (the softmax of one head; libm's expf per element,
 * 2,560 calls per layer for 8 rows of ~80 keys, took most of this file's time before exp_poly) */
static inline float exp_sum(float *restrict w, int64_t n, float m) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        float x = w[t] - m;
        x = x < -87.f ? -87.f : x;  /* exp(-87) ~ 1.6e-38: still a normal float; 2^k stays in range */
        w[t] = exp_poly(x);
        sum += w[t];
    }
    return sum;
}

/* one query head of one row: out = softmax(q . keys[0..n) * scale) @ values[0..n); w: n floats of scratch.
 * Any even D; head_fixed below is the same for D = 16 * NV in registers. */
static inline void head(float *restrict out, const float *restrict q, const float *restrict keys,
                        const float *restrict values, int64_t n, int64_t D, float scale, float *restrict w) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        w[t] = dot(q, keys + t * D, D) * scale;
        m = w[t] > m ? w[t] : m;
    }
    float inv = 1.f / exp_sum(w, n, m);
    memset(out, 0, (size_t)D * sizeof(float));
    for (int64_t t = 0; t < n; t++) axpy(out, w[t], values + t * D, D);
#pragma omp simd
    for (int64_t i = 0; i < D; i++) out[i] *= inv;
}

/* 16 floats as one GCC vector: one zmm register in the AVX-512 clone, two ymm / four xmm in the others.
 * Why not plain loops for the common head sizes: GCC kept `out` in memory across the keys (a store and a
 * reload per key) and summed each dot product's 16 lanes one scalar add at a time; perf showed those two
 * at ~60% of the kernel. Here q and the output stay in registers and a lane sum is four shuffle-adds. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) float lanes_sum(v16 v) {
    v += __builtin_shuffle(v, (i16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (i16){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (i16){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (i16){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

#define HEAD_FIXED(NV)                                                                                        \
    static inline __attribute__((always_inline)) void head_##NV(float *restrict out, const float *restrict q,   \
                                 const float *restrict keys, const float *restrict values, int64_t n,     \
                                 float scale, float *restrict w) {                                        \
        v16 qv[NV], acc[NV];                                                                                 \
        for (int i = 0; i < NV; i++) qv[i] = load16(q + 16 * i);                                             \
        float m = -INFINITY;                                                                                 \
        for (int64_t t = 0; t < n; t++) {                                                                    \
            const float *k = keys + t * 16 * NV;                                                             \
            v16 s = qv[0] * load16(k);                                                                       \
            for (int i = 1; i < NV; i++) s += qv[i] * load16(k + 16 * i);                                    \
            w[t] = lanes_sum(s) * scale;                                                                     \
            m = w[t] > m ? w[t] : m;                                                                         \
        }                                                                                                    \
        float inv = 1.f / exp_sum(w, n, m);                                                                  \
        for (int i = 0; i < NV; i++) acc[i] = (v16){0};                                                      \
        for (int64_t t = 0; t < n; t++) {                                                                    \
            const float *v = values + t * 16 * NV;                                                           \
            for (int i = 0; i < NV; i++) acc[i] += w[t] * load16(v + 16 * i);                                \
        }                                                                                                    \
        for (int i = 0; i < NV; i++) {                                                                       \
            acc[i] *= inv;                                                                                   \
            memcpy(out + 16 * i, &acc[i], sizeof acc[i]);                                                    \
        }                                                                                                    \
    }
HEAD_FIXED(4)  /* D = 64: the tiny and 125m presets */
HEAD_FIXED(8)  /* D = 128: Llama-2 7B's */

/* row b: RoPE, the cache write at (s, p), every query head's attention; out: its H * D outputs. The unit
 * compiled per instruction set (the helpers above inline into each clone). */
CLONES static void one_row(float *restrict out, const float *restrict row, float *kp, float *vp,
                           const float *restrict c, const float *restrict sn, int64_t p, int64_t s, int64_t H,
                           int64_t K, int64_t D, int64_t L, float *restrict scratch, float *restrict q) {
    float scale = 1.f / sqrtf((float)D);
    int64_t G = H / K;
    for (int64_t j = 0; j < K; j++) {
        int64_t at = ((s * K + j) * L + p) * D;
        rope(kp + at, row + (H + j) * D, c, sn, D);
        memcpy(vp + at, row + (H + K + j) * D, (size_t)D * sizeof(float));
    }
    for (int64_t h = 0; h < H; h++) {
        int64_t base = (s * K + h / G) * L * D;
        rope(q, row + h * D, c, sn, D);
        if (D == 64)
            head_4(out + h * D, q, kp + base, vp + base, p + 1, scale, scratch);
        else if (D == 128)
            head_8(out + h * D, q, kp + base, vp + base, p + 1, scale, scratch);
        else
            head(out + h * D, q, kp + base, vp + base, p + 1, D, scale, scratch);
    }
}

static PyObject *attend(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long pqkv, pk, pv, pslots, ppos, pcos, psin, pout;
    Py_ssize_t pos0, B, H, K, D, L, n_slots, n_pos;
    if (!PyArg_ParseTuple(args, "KKKKKnKKKnnnnnnn", &pqkv, &pk, &pv, &pslots, &ppos, &pos0, &pcos, &psin, &pout,
                          &B, &H, &K, &D, &L, &n_slots, &n_pos))
        return NULL;
    if (!pqkv || !pk || !pv || !pcos || !psin || !pout || B < 1 || H < 1 || K < 1 || H % K || D < 2 || D % 2 ||
        L < 1 || n_slots < 1 || n_pos < 1) {
        PyErr_SetString(PyExc_ValueError, "attend: bad pointer or size");
        return NULL;
    }
    const int64_t *slots = (const int64_t *)(uintptr_t)pslots, *pos = (const int64_t *)(uintptr_t)ppos;
    int64_t most = 0;
    for (Py_ssize_t b = 0; b < B; b++) {
        int64_t p = pos ? pos[b] : pos0, s = slots ? slots[b] : b;
        if (p < 0 || p >= L || p >= n_pos || s < 0 || s >= n_slots) {
            PyErr_Format(PyExc_ValueError, "attend: row %zd at position %lld of slot %lld is outside the cache "
                         "(%zd slots of %zd positions, RoPE table of %zd)", b, (long long)p, (long long)s,
                         n_slots, L, n_pos);
            return NULL;
        }
        if (p + 1 > most) most = p + 1;
    }
    float *scratch = malloc((size_t)(most + D) * sizeof(float));
    if (!scratch) return PyErr_NoMemory();
    const float *qkv = (const float *)(uintptr_t)pqkv, *cos = (const float *)(uintptr_t)pcos,
                *sin = (const float *)(uintptr_t)psin;
    float *kp = (float *)(uintptr_t)pk, *vp = (float *)(uintptr_t)pv, *out = (float *)(uintptr_t)pout;
    float *q = scratch + most;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t b = 0; b < B; b++) {
        int64_t p = pos ? pos[b] : pos0, s = slots ? slots[b] : b;
        one_row(out + b * H * D, qkv + b * (H + 2 * K) * D, kp, vp, cos + p * D, sin + p * D, p, s, H, K, D, L,
                scratch, q);
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

/* out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w for each of B rows of C floats: RMSNorm, as torch.rms_norm in
 * fp32 (which costs ~7-14 us a call at decode sizes, nine calls a step) */
CLONES static void rms_rows(float *restrict out, const float *restrict x, const float *restrict w, int64_t B,
                            int64_t C, float eps) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < C; i++) ss += xb[i] * xb[i];
        float r = 1.f / sqrtf(ss / (float)C + eps);
#pragma omp simd
        for (int64_t i = 0; i < C; i++) out[b * C + i] = xb[i] * r * w[i];
    }
}

static PyObject *rms(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pw, pout;
    Py_ssize_t B, C;
    double eps;
    if (!PyArg_ParseTuple(args, "KKKnnd", &px, &pw, &pout, &B, &C, &eps)) return NULL;
    if (!px || !pw || !pout || B < 1 || C < 1) {
        PyErr_SetString(PyExc_ValueError, "rms: bad pointer or size");
        return NULL;
    }
    rms_rows((float *)(uintptr_t)pout, (const float *)(uintptr_t)px, (const float *)(uintptr_t)pw, B, C,
             (float)eps);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ matrix multiplies of a few rows
 * linear(out, x, wp, res, M, K, P, N, mode, threads): out [M, N] from x [M, K] (contiguous rows), on
 * `threads` threads (see "threads for linear" below), and a weight W
 * [K, N] packed into P panels of 16 columns, two by two (Panels in model/generate.py): panel pair q is
 * [K, 32] contiguous, wp[(q * K + k) * 32 + i * 16 + j] = panel 2q + i's column j at row k, and panel p
 * holds W[:, 16p..16p+15], zero past the last column; P even. One pair is one sequential stream for the
 * hardware prefetcher (two separate [K, 16] panels measured ~4% slower for 8 rows). mode 0: out = x @ W;
 * mode 1: out = res + x @ W (res [M, N]: the residual add); mode 2 (SwiGLU): panels 2q and 2q + 1 hold the
 * gate's and the up projection's columns 16q..16q+15, and out [M, N] = silu(x @ Wgate) * (x @ Wup) with N
 * = the FFN width.
 *
 * Why ours: the engine's batched decode step (2-16 rows) and its prompt chunks. torch's oneDNN linear costs
 * ~10 us a call before any arithmetic (12 us for 1 row of 256x256, where MKL's sgemv takes 3.3), 17 calls
 * a step of the tiny preset, and MKL's sgemm runs its AVX2 path on AMD Zen 5. Here a call costs ~1 us.
 * Each output element is one accumulator summed over k = 0..K-1 in order, whatever the row count and
 * wherever the row falls in a tile, so a row gets the same bits in any company (continuous batching's
 * greedy results do not depend on who else is decoding).
 *
 * The tile: up to MR = 8 rows x 2 panels (32 columns) = 16 accumulators of 16 floats, 16 of the AVX-512
 * clone's 32 zmm registers; per k, two panel loads and eight broadcasts feed sixteen FMAs. Without AVX-512
 * (16 ymm registers, a v16 taking two) tiles stop at 4 rows, which keeps the accumulators in registers.
 * Panel pairs are the outer loop, so a pair (K x 32 floats: 32 KB at K = 256) stays in L1/L2 while every
 * row group reads it. Measured on one AMD Zen 5 core against torch's oneDNN linear (packed weights): 8 rows
 * of the tiny preset's 256x512 / 256x1408 / 704x256 / 256x4096 matrices 9.5 / 24.0 / 12.3 / 68.3 us vs
 * 19.7 / 37.4 / 23.7 / 85.7; 99 rows within a few % of it (~260 GFLOP/s); one row 3.2 vs 3.4 us (MKL's
 * sgemv) for 256x256. */
#define MR 8
#ifndef MIN_PART_FLOP
#define MIN_PART_FLOP 200000
#endif

static inline __attribute__((always_inline)) void tile(int mr, const float *restrict x, int64_t K,
                                                       const float *restrict w0, const float *restrict w1,
                                                       v16 acc[MR][2]) {
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = (v16){0};
    for (int64_t k = 0; k < K; k++) {
        v16 a = load16(w0 + k * 32), b = load16(w1 + k * 32);
        for (int r = 0; r < mr; r++) {
            float xv = x[r * K + k];
            acc[r][0] += xv * a;
            acc[r][1] += xv * b;
        }
    }
}

/* elementwise max / min of 16 floats by bit select (GCC's C has no vector ?: or fmax) */
static inline __attribute__((always_inline)) v16 vmax(v16 a, v16 b) {
    i16 m = a > b;
    return (v16)(((i16)a & m) | ((i16)b & ~m));
}
static inline __attribute__((always_inline)) v16 vmin(v16 a, v16 b) {
    i16 m = a < b;
    return (v16)(((i16)a & m) | ((i16)b & ~m));
}

/* exp_poly on 16 floats in [-87, 88]: the same reduction and polynomial, floor as truncation minus one where
 * that rounded up. Why by hand: the scalar loop GCC left unvectorized ("no vectype" for the copied lanes)
 * cost ~2.3 ns an element, 13 of the 37 us of an 8-row 256x1408 SwiGLU call. */
static inline __attribute__((always_inline)) v16 exp16(v16 x) {
    v16 t = x * 1.44269504f + 0.5f;
    i16 ki = __builtin_convertvector(t, i16);  /* toward zero */
    v16 k = __builtin_convertvector(ki, v16);
    i16 up = k > t;                             /* -1 where truncation went up (negative t) */
    ki += up;
    k += __builtin_convertvector(up, v16);
    v16 r = EXP_REDUCE(x, k), p;
    EXP_POLY_R(p, r);
    i16 bits = (ki + 127) << 23;
    v16 two;
    memcpy(&two, &bits, sizeof two);
    return p * two;
}

/* o[0..n) = silu(g) * u = g / (1 + exp(-g)) * u, n <= 16 */
static inline __attribute__((always_inline)) void swiglu16(float *restrict o, v16 g, v16 u, int64_t n) {
    v16 lo = {0}, hi = {0};
    lo -= 87.f;
    hi += 88.f;
    v16 t = g / (1.f + exp16(vmin(vmax(-g, lo), hi))) * u;
    if (n == 16)
        memcpy(o, &t, sizeof t);
    else
        memcpy(o, &t, (size_t)n * sizeof(float));
}

/* panel pairs q0..q1-1 (columns 32 q0.. of out; 16 q0.. for SwiGLU) */
CLONES static void gemm(float *restrict out, const float *restrict x, const float *restrict wp,
                        const float *restrict res, int64_t M, int64_t K, int64_t N, int mode, int mr_max,
                        int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; q++) {
        const float *w0 = wp + q * K * 32, *w1 = w0 + 16;  /* the pair's two panels, interleaved per k */
        for (int64_t m0 = 0; m0 < M; m0 += mr_max) {
            int mr = M - m0 < mr_max ? (int)(M - m0) : mr_max;
            const float *xr = x + m0 * K;
            v16 acc[MR][2];
            switch (mr) {  /* constant row counts: the accumulators stay in registers */
            case 8: tile(8, xr, K, w0, w1, acc); break;
            case 7: tile(7, xr, K, w0, w1, acc); break;
            case 6: tile(6, xr, K, w0, w1, acc); break;
            case 5: tile(5, xr, K, w0, w1, acc); break;
            case 4: tile(4, xr, K, w0, w1, acc); break;
            case 3: tile(3, xr, K, w0, w1, acc); break;
            case 2: tile(2, xr, K, w0, w1, acc); break;
            default: tile(1, xr, K, w0, w1, acc); break;
            }
            for (int r = 0; r < mr; r++) {
                int64_t m = m0 + r;
                if (mode == 2) {
                    int64_t c0 = 16 * q, n = N - c0 < 16 ? N - c0 : 16;
                    swiglu16(out + m * N + c0, acc[r][0], acc[r][1], n);
                    continue;
                }
                int64_t c0 = 32 * q, n = N - c0 < 32 ? N - c0 : 32;
                float t[32];
                memcpy(t, &acc[r][0], 16 * sizeof(float));
                memcpy(t + 16, &acc[r][1], 16 * sizeof(float));
                if (mode == 1) {
                    const float *rr = res + m * N + c0;
#pragma omp simd
                    for (int64_t j = 0; j < n; j++) t[j] += rr[j];
                }
                memcpy(out + m * N + c0, t, (size_t)n * sizeof(float));
            }
        }
    }
}

/* ------------------------------------------------------------------ threads for linear
 * A call with threads = T > 1 splits the panel pairs into T contiguous parts: the calling thread computes
 * part 0 and T - 1 pool threads the others (each output column is computed by one thread, the same way as
 * on one, so the bits do not depend on T). Pool threads are started on first use and live for the
 * process; between jobs a thread spins for a while (a decode step is ~17 back-to-back calls, and a wake
 * through the kernel costs more than a small call's work), then sleeps on a condition variable, so an
 * idle server costs nothing. One job at a time: a second caller meanwhile computes alone. After fork() the
 * child has no pool threads; it starts its own when it needs them. */
typedef struct {
    float *out;
    const float *x, *wp, *res;
    int64_t M, K, N, pairs;
    int mode, mr_max, parts;
} job_t;

static void run_part(const job_t *j, int part) {
    int64_t q0 = j->pairs * part / j->parts, q1 = j->pairs * (part + 1) / j->parts;
    if (q1 > q0) gemm(j->out, j->x, j->wp, j->res, j->M, j->K, j->N, j->mode, j->mr_max, q0, q1);
}

#if !defined(_WIN32)
#include <pthread.h>
#include <stdatomic.h>
#define POOL_MAX 63
#define SPIN 200000  /* polls of the job counter before sleeping: ~1-2 ms */

static job_t pool_job;
static atomic_uint pool_gen;   /* bumped once per job, under pool_mu */
static atomic_int pool_left;   /* pool threads that have not finished the current job */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;
static int pool_n = 0;         /* pool threads started (in this process) */
static int pool_atfork = 0;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *pool_main(void *arg) {
    /* arg: the thread's part (1..pool_n) in the low byte, the job counter when it was started above it (a
     * thread that first runs after the next job was posted must still see that job as new) */
    int part = (int)((uintptr_t)arg & 0xff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8);
    for (;;) {
        unsigned g;
        for (int spin = 0; (g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen; spin++) {
            if (spin < SPIN) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool_mu);
            while ((g = atomic_load(&pool_gen)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
            break;
        }
        seen = g;
        if (part < pool_job.parts) run_part(&pool_job, part);
        atomic_fetch_sub_explicit(&pool_left, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void pool_after_fork(void) {  /* the child: no pool threads, fresh locks */
    pool_n = 0;
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pthread_mutex_init(&pool_busy, NULL);
}

/* 1 when the pool ran the job, 0 when the caller should compute it alone */
static int pool_run(const job_t *j) {
    if (pthread_mutex_trylock(&pool_busy) != 0) return 0;
    if (!pool_atfork) {
        pthread_atfork(NULL, NULL, pool_after_fork);
        pool_atfork = 1;
    }
    while (pool_n < j->parts - 1 && pool_n < POOL_MAX) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 20);
        uintptr_t arg = ((uintptr_t)atomic_load(&pool_gen) << 8) | (uintptr_t)(pool_n + 1);
        int rc = pthread_create(&t, &attr, pool_main, (void *)arg);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool_n++;
    }
    if (pool_n < j->parts - 1) {
        pthread_mutex_unlock(&pool_busy);
        return 0;
    }
    pool_job = *j;
    atomic_store(&pool_left, pool_n);
    pthread_mutex_lock(&pool_mu);
    atomic_fetch_add_explicit(&pool_gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    run_part(j, 0);
    while (atomic_load_explicit(&pool_left, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool_busy);
    return 1;
}
#else
static int pool_run(const job_t *j) {
    (void)j;
    return 0;
}
#endif

static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long pout, px, pw, pres;
    Py_ssize_t M, K, P, N;
    int mode, threads;
    if (!PyArg_ParseTuple(args, "KKKKnnnnii", &pout, &px, &pw, &pres, &M, &K, &P, &N, &mode, &threads))
        return NULL;
    Py_ssize_t cols = mode == 2 ? P / 2 * 16 : P * 16;
    if (!pout || !px || !pw || (mode == 1 && !pres) || mode < 0 || mode > 2 || M < 1 || K < 1 || P < 2 ||
        P % 2 || N < 1 || N > cols || N <= cols - (mode == 2 ? 16 : 32) || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "linear: bad pointer, size, mode or thread count");
        return NULL;
    }
    static int mr_max = 0;
    if (!mr_max) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
        mr_max = __builtin_cpu_supports("avx512f") ? MR : 4;
#else
        mr_max = 4;
#endif
    }
    job_t j = {(float *)(uintptr_t)pout, (const float *)(uintptr_t)px, (const float *)(uintptr_t)pw,
               (const float *)(uintptr_t)pres, M, K, N, P / 2, mode, mr_max, 1};
    /* a part gets at least MIN_PART_FLOP of work: below that the hand-off costs more than the split saves */
    int64_t work = 2 * M * K * P * 16 / MIN_PART_FLOP;
    j.parts = threads < work ? threads : (int)(work > 1 ? work : 1);
    if (j.parts > j.pairs) j.parts = (int)j.pairs;
    Py_BEGIN_ALLOW_THREADS
    if (j.parts < 2 || !pool_run(&j)) {
        j.parts = 1;
        run_part(&j, 0);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"attend", attend, METH_VARARGS, "RoPE, cache write and causal attention of one decode step (see the file)."},
    {"rms", rms, METH_VARARGS, "RMSNorm of B contiguous rows of C floats (see the file)."},
    {"linear", linear, METH_VARARGS, "A few rows times a panel-packed weight, with a residual or SwiGLU (see the file)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decodec", "FastDecode's C attention step.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__decodec(void) { return PyModule_Create(&module); }
