"""CUDA kernels of the GPU backend (compiled at run time by CuPy's NVRTC), and their launchers.

They know nothing of models or files: device arrays in, device arrays out, outputs preallocated. Every
kernel that depends on the position reads it from a device int (`pos`), so a decode step captured once as a
CUDA graph replays unchanged at every position. Shapes follow the CPU kernels (minirt/cpu/kernels.py):
activations x (T, D) float32; matrices (out, in) in float16, bfloat16 or float32, read 16 bytes per lane;
the KV cache of one layer (n_kv_heads, capacity, head_dim) float32.

    gemv       out = epilogue(x · Wᵀ + b) for T rows; one warp per output row, the weight row read once per
               4 rows of x. Epilogues: store, add to out (residual), SwiGLU of the gate|up halves, GELU.
    lowrank    out = epilogue((x · Vᵀ) · Uᵀ + b) in ONE kernel: a persistent grid computes the r-vector
               (phase 1), meets at a grid-wide barrier, then every warp reads it back from L2 (phase 2).
               The r-vector never goes through a second launch or through host memory.
    verify     speculative decoding's acceptance rule over K+1 rows in one block: greedy (argmax match)
               or rejection sampling (u < p(x)/q(x); residual max(0, p − q) drawn on the first rejection;
               bonus token from the last row) → (accepted length, next token). K = 0 is plain sampling.
"""
from __future__ import annotations

import ctypes

import numpy as np

SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define INF __int_as_float(0x7f800000)
#define TT 4          // rows of x per pass over a weight row
#define ACH 1024      // attention: positions scored per chunk (shared memory)

// Programmatic dependent launch (sm_90+; no-ops below it and when a kernel was launched without it): every
// kernel first lets the next one in the stream start launching (its blocks come up while this one runs), then
// waits until the kernel before it has finished and its writes are visible, before it reads anything that
// kernel wrote. Work that reads no such data (a weight prefetch) goes between the two.
__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }

// GGUF block formats, kept as stored with the per-block scales split off (the same bytes as the file):
// quants (rows, K) int8 for Q8_0, (rows, K/2) bytes for Q4_0/Q4_1 (byte i of a block: weight i in the low
// nibble, weight i + 16 in the high one); d (rows, K/32) float16 scales; m (rows, K/32) float16 minimums (Q4_1).
// Q8_0: w = d·q · Q4_0: w = d·(q − 8) · Q4_1: w = d·q + m
struct q8_0 {};
struct q4_0 {};
struct q4_1 {};
template <typename A, typename B> struct Same { static constexpr bool v = false; };
template <typename A> struct Same<A, A> { static constexpr bool v = true; };
template <typename W> struct IsQ { static constexpr bool v = Same<W, q8_0>::v || Same<W, q4_0>::v || Same<W, q4_1>::v; };
struct QS { const unsigned short* d; const unsigned short* m; };
__device__ __forceinline__ float h2f(unsigned short b) { return __half2float(__ushort_as_half(b)); }

// Element i of row `row` (K wide) of a quantized matrix (embedding lookups).
template <typename W>
__device__ __forceinline__ float deq1(const W* w, QS s, size_t row, int i, int K) {
    const unsigned char* q = reinterpret_cast<const unsigned char*>(w);
    size_t b = row * (size_t)(K >> 5) + (i >> 5);
    float d = h2f(s.d[b]);
    if constexpr (Same<W, q8_0>::v) {
        return d * (float)(signed char)q[row * K + i];
    } else {
        unsigned int byte = q[row * (size_t)(K >> 1) + (size_t)(i >> 5) * 16 + (i & 15)];
        float n = (float)((i & 31) < 16 ? (byte & 15u) : (byte >> 4));
        if constexpr (Same<W, q4_1>::v) return d * n + h2f(s.m[b]);
        else return d * (n - 8.f);
    }
}

// 8 weights as raw bits: loads first, conversion at use (more loads in flight per lane).
template <typename W> struct Pack { uint4 v; };
template <> struct Pack<float> { uint4 v, w; };
__device__ __forceinline__ void ldp(Pack<__half>& p, const __half* q) { p.v = __ldg(reinterpret_cast<const uint4*>(q)); }
__device__ __forceinline__ void ldp(Pack<__nv_bfloat16>& p, const __nv_bfloat16* q) {
    p.v = __ldg(reinterpret_cast<const uint4*>(q));
}
__device__ __forceinline__ void ldp(Pack<float>& p, const float* q) {
    p.v = __ldg(reinterpret_cast<const uint4*>(q));
    p.w = __ldg(reinterpret_cast<const uint4*>(q + 4));
}
__device__ __forceinline__ void cvt(const Pack<__half>& p, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&p.v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 a = __half22float2(h[i]); f[2 * i] = a.x; f[2 * i + 1] = a.y; }
}
__device__ __forceinline__ void cvt(const Pack<__nv_bfloat16>& p, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&p.v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 a = __bfloat1622float2(h[i]); f[2 * i] = a.x; f[2 * i + 1] = a.y; }
}
__device__ __forceinline__ void cvt(const Pack<float>& p, float* f) {
    const float* a = reinterpret_cast<const float*>(&p.v);
    const float* b = reinterpret_cast<const float*>(&p.w);
#pragma unroll
    for (int i = 0; i < 4; ++i) { f[i] = a[i]; f[4 + i] = b[i]; }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Every thread gets the block's total. red: 32 floats of shared memory.
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    return warp_sum(l < nw ? red[l] : 0.f);
}
__device__ float block_max(float v, float* red) {
    v = warp_max(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    return warp_max(l < nw ? red[l] : -INF);
}
// (value, index) argmax over the block, lowest index on ties (numpy's argmax).
__device__ void block_argmax(float& bv, int& bi, float* redf, int* redi) {
#pragma unroll
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (l == 0) { redf[w] = bv; redi[w] = bi; }
    __syncthreads();
    bv = l < nw ? redf[l] : -INF;
    bi = l < nw ? redi[l] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
}

__device__ __forceinline__ float gelu_new(float v) {
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// x rows of activations: CG = true reads through L2 only (data written earlier in the same kernel).
template <bool CG>
__device__ __forceinline__ void ld8x(const float* xp, float* f) {
    float4 a, b;
    if (CG) { a = __ldcg(reinterpret_cast<const float4*>(xp)); b = __ldcg(reinterpret_cast<const float4*>(xp + 4)); }
    else { a = *reinterpret_cast<const float4*>(xp); b = *reinterpret_cast<const float4*>(xp + 4); }
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// The norm applied on the fly to the rows of x: h = (x − mu) · r · w + b, from statistics that the kernels
// producing x accumulated (st: per row Σx and Σx², double). w == nullptr: x as it is.
struct Norm {
    const double* st;
    const float* w;
    const float* b;
    float eps;
    int layer;
};

__device__ __forceinline__ void norm_coef(const Norm& nm, int t, int D, float& mu, float& r) {
    double s = __ldcg(nm.st + 2 * t), ss = __ldcg(nm.st + 2 * t + 1);
    double m = nm.layer ? s / D : 0.0;
    mu = (float)m;
    r = 1.f / sqrtf((float)(ss / D - m * m) + nm.eps);
}

#define UNR 4  // 16-byte weight loads issued per lane before the arithmetic that uses them

// a[i] (+ a2[i] for a second row wr2) += Σ_{k in [k0, k1)} w[k] · h[t0 + i][k] over this lane's k (lanes
// stride 8 elements, a warp covers 256 per round); k0, k1 multiples of 8; h = x, or norm(x) with NORM.
template <typename W, bool CG, bool TWO, bool NORM>
__device__ __forceinline__ void dot_range(const float* x, int K, const W* __restrict__ wr, const W* __restrict__ wr2,
                                          int k0, int k1, int lane, int t0, int nt, const Norm& nm,
                                          const float* mu, const float* r, float* a, float* a2) {
    for (int kb = k0 + lane * 8; kb < k1; kb += 256 * UNR) {
        Pack<W> p[UNR], q[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            int k = kb + u * 256;
            if (k < k1) { ldp(p[u], wr + k); if (TWO) ldp(q[u], wr2 + k); }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            int k = kb + u * 256;
            if (k < k1) {
                float wf[8], wg[8], nw[8], nb[8];
                cvt(p[u], wf);
                if (TWO) cvt(q[u], wg);
                if (NORM) {
                    ld8x<false>(nm.w + k, nw);
                    if (nm.b) ld8x<false>(nm.b + k, nb);
                    else
#pragma unroll
                        for (int j = 0; j < 8; ++j) nb[j] = 0.f;
                }
#pragma unroll
                for (int i = 0; i < TT; ++i) {
                    if (i < nt) {
                        float h[8];
                        ld8x<CG>(x + (size_t)(t0 + i) * K + k, h);
                        if (NORM)
#pragma unroll
                            for (int j = 0; j < 8; ++j) h[j] = (h[j] - mu[i]) * r[i] * nw[j] + nb[j];
                        float s = 0.f, s2 = 0.f;
#pragma unroll
                        for (int j = 0; j < 8; ++j) { s += wf[j] * h[j]; if (TWO) s2 += wg[j] * h[j]; }
                        a[i] += s;
                        if (TWO) a2[i] += s2;
                    }
                }
            }
        }
    }
}

// The same for a quantized matrix, with dot_range's lane layout (lane takes weights k … k+7, k = 8·lane + 256·u:
// the x reads of a warp are contiguous): each lane loads the 8 bytes that hold its 8 quants (Q8_0: 8 int8;
// Q4: the low or high nibbles of 8 bytes, chunks c and c+2 of a block share them) and the block's scale
// (and minimum), UNR rounds in flight; w = d·q (Q8_0), d·(q − 8) (Q4_0), d·q + m (Q4_1).
template <typename W>
__device__ __forceinline__ void deq8(uint2 P, float d, float m, int k, float* f) {
    if constexpr (Same<W, q8_0>::v) {
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = d * (float)(signed char)(((j < 4 ? P.x : P.y) >> (8 * (j & 3))) & 0xffu);
    } else {
        int sh = (k & 16) ? 4 : 0;  // weights 16..31 of a block: the high nibbles
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float n = (float)((((j < 4 ? P.x : P.y) >> (8 * (j & 3))) >> sh) & 15u);
            if constexpr (Same<W, q4_1>::v) f[j] = d * n + m;
            else f[j] = d * (n - 8.f);
        }
    }
}

template <typename W, bool CG, bool TWO, bool NORM>
__device__ __forceinline__ void dot_q(const float* x, int K, const W* w, QS s, int row, int row2, int lane, int t0,
                                      int nt, const Norm& nm, const float* mu, const float* r, float* a, float* a2) {
    constexpr bool Q8 = Same<W, q8_0>::v, Q41 = Same<W, q4_1>::v;
    constexpr int QB = Q8 ? 32 : 16;  // quant bytes per block
    int nb = K >> 5;
    const unsigned char* q1 = reinterpret_cast<const unsigned char*>(w) + (size_t)row * nb * QB;
    const unsigned char* q2 = reinterpret_cast<const unsigned char*>(w) + (size_t)row2 * nb * QB;
    const unsigned short* d1 = s.d + (size_t)row * nb;
    const unsigned short* d2 = s.d + (size_t)row2 * nb;
    const unsigned short* m1 = Q41 ? s.m + (size_t)row * nb : nullptr;
    const unsigned short* m2 = Q41 ? s.m + (size_t)row2 * nb : nullptr;
    for (int kb = lane * 8; kb < K; kb += 256 * UNR) {
        uint2 P[UNR], R[UNR];
        unsigned short D[UNR], M[UNR], D2[UNR], M2[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            int k = kb + u * 256;
            if (k < K) {
                int b = k >> 5, off = Q8 ? (k & ~7) : b * 16 + (k & 8);
                P[u] = __ldg(reinterpret_cast<const uint2*>(q1 + off));
                D[u] = __ldg(d1 + b);
                if (Q41) M[u] = __ldg(m1 + b);
                if (TWO) {
                    R[u] = __ldg(reinterpret_cast<const uint2*>(q2 + off));
                    D2[u] = __ldg(d2 + b);
                    if (Q41) M2[u] = __ldg(m2 + b);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            int k = kb + u * 256;
            if (k < K) {
                float wf[8], wg[8], nw[8], nb8[8];
                deq8<W>(P[u], h2f(D[u]), Q41 ? h2f(M[u]) : 0.f, k, wf);
                if (TWO) deq8<W>(R[u], h2f(D2[u]), Q41 ? h2f(M2[u]) : 0.f, k, wg);
                if (NORM) {
                    ld8x<false>(nm.w + k, nw);
                    if (nm.b) ld8x<false>(nm.b + k, nb8);
                    else
#pragma unroll
                        for (int j = 0; j < 8; ++j) nb8[j] = 0.f;
                }
#pragma unroll
                for (int i = 0; i < TT; ++i) {
                    if (i < nt) {
                        float h[8];
                        ld8x<CG>(x + (size_t)(t0 + i) * K + k, h);
                        if (NORM)
#pragma unroll
                            for (int j = 0; j < 8; ++j) h[j] = (h[j] - mu[i]) * r[i] * nw[j] + nb8[j];
                        float s1 = 0.f, s2 = 0.f;
#pragma unroll
                        for (int j = 0; j < 8; ++j) { s1 += wf[j] * h[j]; if (TWO) s2 += wg[j] * h[j]; }
                        a[i] += s1;
                        if (TWO) a2[i] += s2;
                    }
                }
            }
        }
    }
}

// Store one output and return it. mode 0: out = acc + b · 1: out += acc + b · 2: out = silu(g + bg) · (u + bu)
// · 3: out = gelu(acc + b)
__device__ __forceinline__ float store_out(float* out, int t, int row, int N, int rows, int mode, float a, float a2,
                                           const float* __restrict__ bias) {
    float b = bias ? bias[row] : 0.f, v;
    if (mode == 0) v = out[(size_t)t * N + row] = a + b;
    else if (mode == 1) v = out[(size_t)t * N + row] = __ldcg(out + (size_t)t * N + row) + a + b;
    else if (mode == 3) v = out[(size_t)t * N + row] = gelu_new(a + b);
    else {
        float g = a + b, u = a2 + (bias ? bias[row + rows] : 0.f);
        v = out[(size_t)t * rows + row] = g / (1.f + expf(-g)) * u;
    }
    return v;
}

// One warp computes output row `row` (and, for SwiGLU, row + rows) for all T rows of x, then stores it;
// with sacc (shared, 2 doubles per row of x), adds the stored values and their squares to it.
// pair (modes 0, 1, 3): the warp also computes row + pair, its loads interleaved with row's (more in flight).
template <typename W, bool CG>
__device__ __forceinline__ void warp_row(const float* x, const W* __restrict__ w, const float* __restrict__ bias,
                                         float* out, int T, int K, int N, int mode, int row, int lane,
                                         const Norm& nm, double* sacc, int pair = 0, QS qs = QS{nullptr, nullptr}) {
    int rows = mode == 2 ? N / 2 : N;
    bool two = mode == 2 || pair;
    int row2 = row + (mode == 2 ? rows : pair);
    const W* wr = w + (IsQ<W>::v ? 0 : (size_t)row * K);
    const W* wr2 = w + (IsQ<W>::v ? 0 : (size_t)row2 * K);
    for (int t0 = 0; t0 < T; t0 += TT) {
        int nt = min(TT, T - t0);
        float a[TT], a2[TT], mu[TT], r[TT];
#pragma unroll
        for (int i = 0; i < TT; ++i) {
            a[i] = 0.f; a2[i] = 0.f; mu[i] = 0.f; r[i] = 1.f;
            if (nm.w && i < nt) norm_coef(nm, t0 + i, K, mu[i], r[i]);
        }
        if constexpr (IsQ<W>::v) {
            if (nm.w) {
                if (two) dot_q<W, CG, true, true>(x, K, w, qs, row, row2, lane, t0, nt, nm, mu, r, a, a2);
                else dot_q<W, CG, false, true>(x, K, w, qs, row, row2, lane, t0, nt, nm, mu, r, a, a2);
            } else {
                if (two) dot_q<W, CG, true, false>(x, K, w, qs, row, row2, lane, t0, nt, nm, mu, r, a, a2);
                else dot_q<W, CG, false, false>(x, K, w, qs, row, row2, lane, t0, nt, nm, mu, r, a, a2);
            }
        } else {
            if (nm.w) {
                if (two) dot_range<W, CG, true, true>(x, K, wr, wr2, 0, K, lane, t0, nt, nm, mu, r, a, a2);
                else dot_range<W, CG, false, true>(x, K, wr, wr2, 0, K, lane, t0, nt, nm, mu, r, a, a2);
            } else {
                if (two) dot_range<W, CG, true, false>(x, K, wr, wr2, 0, K, lane, t0, nt, nm, mu, r, a, a2);
                else dot_range<W, CG, false, false>(x, K, wr, wr2, 0, K, lane, t0, nt, nm, mu, r, a, a2);
            }
        }
#pragma unroll
        for (int i = 0; i < TT; ++i)
            if (i < nt) { a[i] = warp_sum(a[i]); if (two) a2[i] = warp_sum(a2[i]); }
        if (lane == 0)
            for (int i = 0; i < nt; ++i) {
                float v = store_out(out, t0 + i, row, N, rows, mode, a[i], a2[i], bias);
                if (sacc) { atomicAdd(sacc + 2 * (t0 + i), (double)v); atomicAdd(sacc + 2 * (t0 + i) + 1, (double)v * v); }
                if (pair && mode != 2) {
                    v = store_out(out, t0 + i, row + pair, N, rows, mode, a2[i], 0.f, bias);
                    if (sacc) {
                        atomicAdd(sacc + 2 * (t0 + i), (double)v);
                        atomicAdd(sacc + 2 * (t0 + i) + 1, (double)v * v);
                    }
                }
            }
    }
}

// A block computes output row `row` with its warps splitting K (for matrices with few, long rows).
// red: ≥ 32 · TT floats of shared memory. Plain store (mode 0), no bias.
// pair: also row + pair (loads interleaved). red: ≥ 2 · 32 · TT floats.
template <typename W>
__device__ __forceinline__ void block_row(const float* x, const W* __restrict__ w, float* out, int T, int K, int N,
                                          int row, float* red, const Norm& nm, int pair = 0) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int slice = ((K + nwarps * 8 - 1) / (nwarps * 8)) * 8;
    int k0 = min(K, warp * slice), k1 = min(K, k0 + slice);
    const W* wr = w + (size_t)row * K;
    const W* wr2 = w + (size_t)(row + pair) * K;
    for (int t0 = 0; t0 < T; t0 += TT) {
        int nt = min(TT, T - t0);
        float a[TT], a2[TT], mu[TT], r[TT];
#pragma unroll
        for (int i = 0; i < TT; ++i) {
            a[i] = 0.f; a2[i] = 0.f; mu[i] = 0.f; r[i] = 1.f;
            if (nm.w && i < nt) norm_coef(nm, t0 + i, K, mu[i], r[i]);
        }
        if (pair) {
            if (nm.w) dot_range<W, false, true, true>(x, K, wr, wr2, k0, k1, lane, t0, nt, nm, mu, r, a, a2);
            else dot_range<W, false, true, false>(x, K, wr, wr2, k0, k1, lane, t0, nt, nm, mu, r, a, a2);
        } else {
            if (nm.w) dot_range<W, false, false, true>(x, K, wr, wr, k0, k1, lane, t0, nt, nm, mu, r, a, a2);
            else dot_range<W, false, false, false>(x, K, wr, wr, k0, k1, lane, t0, nt, nm, mu, r, a, a2);
        }
#pragma unroll
        for (int i = 0; i < TT; ++i)
            if (i < nt) { a[i] = warp_sum(a[i]); if (pair) a2[i] = warp_sum(a2[i]); }
        if (lane == 0)
            for (int i = 0; i < TT; ++i) { red[warp * TT + i] = a[i]; red[(32 + warp) * TT + i] = a2[i]; }
        __syncthreads();
        if ((int)threadIdx.x < nt) {
            float s = 0.f, s2 = 0.f;
            for (int j = 0; j < nwarps; ++j) { s += red[j * TT + threadIdx.x]; s2 += red[(32 + j) * TT + threadIdx.x]; }
            out[(size_t)(t0 + threadIdx.x) * N + row] = s;
            if (pair) out[(size_t)(t0 + threadIdx.x) * N + row + pair] = s2;
        }
        __syncthreads();
    }
}

// Output statistics (ost, T ≤ 16 rows): the block's sums gather in shared memory, then one atomic per value.
__device__ __forceinline__ void stats_begin(double* sacc, double* ost, int T) {
    if (ost) {
        if ((int)threadIdx.x < 2 * T) sacc[threadIdx.x] = 0.0;
        __syncthreads();
    }
}
__device__ __forceinline__ void stats_end(double* sacc, double* ost, int T) {
    if (ost) {
        __syncthreads();
        if ((int)threadIdx.x < 2 * T) atomicAdd(ost + threadIdx.x, sacc[threadIdx.x]);
    }
}

// L2 prefetch: the grid's threads pull a byte range into L2, one 128-byte line per thread and round, for a
// later phase; no thread waits for it.
__device__ __forceinline__ void l2_prefetch(unsigned long long p, size_t bytes) {
    size_t nth = (size_t)gridDim.x * blockDim.x, tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p)
        for (size_t o = tid * 128; o < bytes; o += nth * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
}

// gemv on a tall matrix (the head: many short rows) gives each warp rows r and r + rows/2, their loads
// interleaved: twice the bytes in flight per warp. 0: a row per warp.
__device__ __forceinline__ int gemv_pair(int rows, int mode) {
    return (mode != 2 && rows >= 8192 && rows % 2 == 0) ? rows / 2 : 0;
}
// The lanes of a warp pull row `row` of w (values, or quants, scales and minimums) into L2.
template <typename W>
__device__ __forceinline__ void prefetch_row(const W* w, const unsigned short* wd, const unsigned short* wm, int row,
                                             int K, int lane) {
    if constexpr (IsQ<W>::v) {
        size_t nb = K >> 5, qb = nb * (Same<W, q8_0>::v ? 32 : 16);
        unsigned long long q = reinterpret_cast<unsigned long long>(w) + row * qb;
        for (size_t o = lane * 128; o < qb; o += 32 * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(q + o));
        if (lane == 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(wd + row * nb));
        if (lane == 1 && wm) asm volatile("prefetch.global.L2 [%0];" ::"l"(wm + row * nb));
    } else {
        size_t rb = (size_t)K * sizeof(W);
        unsigned long long q = reinterpret_cast<unsigned long long>(w) + row * rb;
        for (size_t o = lane * 128; o < rb; o += 32 * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(q + o));
    }
}

// out = epilogue(h · Wᵀ + b), h = x or norm(x) (nst: statistics of x; nw, nb, eps, layer: the norm).
// ost: where the statistics of the stored outputs accumulate (the next norm's input), or null.
template <typename W>
__global__ void gemv(const float* __restrict__ x, const W* __restrict__ w, const unsigned short* wd,
                     const unsigned short* wm, const float* __restrict__ bias,
                     float* __restrict__ out, int T, int K, int N, int mode, const double* __restrict__ nst,
                     const float* __restrict__ nw, const float* __restrict__ nb, float eps, int layer, double* ost) {
    __shared__ double sacc[32];
    Norm nm{nst, nw, nb, eps, layer};
    pdl_launch();
    int rows = mode == 2 ? N / 2 : N;
    int pair = gemv_pair(rows, mode), todo = pair ? pair : rows;
    int lane = threadIdx.x & 31, nwarp = (gridDim.x * blockDim.x) >> 5;
    int row0 = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row0 < todo) {  // the weights do not depend on the kernel before: start pulling them into L2
        prefetch_row<W>(w, wd, wm, row0, K, lane);
        if (mode == 2 || pair) prefetch_row<W>(w, wd, wm, row0 + (mode == 2 ? rows : pair), K, lane);
    }
    pdl_wait();
    stats_begin(sacc, ost, T);
    for (int row = row0; row < todo; row += nwarp)
        warp_row<W, false>(x, w, bias, out, T, K, N, mode, row, lane, nm, ost ? sacc : nullptr, pair, QS{wd, wm});
    stats_end(sacc, ost, T);
}

// Grid-wide barrier for a grid whose blocks are all resident (the launcher sizes it from the occupancy).
// bar[0] counts arrivals (reset by the last one), bar[1] is the generation the others wait on.
__device__ void grid_barrier(int* bar) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile int* gen = bar + 1;
        int g = *gen;
        __threadfence();
        if (atomicAdd(bar, 1) == (int)gridDim.x - 1) {
            atomicExch(bar, 0);
            __threadfence();
            atomicAdd(bar + 1, 1);
        } else {
            while (*gen == g) __nanosleep(32);
        }
        __threadfence();
    }
    __syncthreads();
}

// out = epilogue((h · vᵀ) · uᵀ + b): v (R, K), u (N, R), mid (T, R) scratch; R a multiple of 8 (zero-padded);
// h = x or norm(x) as in gemv. Phase 1: blocks take rows of v (warps split K; p1warp: a warp per row, for
// short rows). Grid barrier. Phase 2: each
// block copies the r-vectors into shared memory once (stage = 1; else reads them through L2), warps take
// rows of u. The r-vectors never leave the chip (L2, then shared memory).
template <typename W>
__global__ void lowrank(const float* __restrict__ x, const W* __restrict__ v, const W* __restrict__ u,
                        const float* __restrict__ bias, float* mid, float* __restrict__ out, int* bar,
                        int T, int K, int R, int N, int mode, int stage, const double* __restrict__ nst,
                        const float* __restrict__ nw, const float* __restrict__ nb, float eps, int layer,
                        double* ost, int p1warp, int prefetch) {
    pdl_launch();
    pdl_wait();
    extern __shared__ float smem[];
    __shared__ float red[2 * 32 * TT];
    __shared__ double sacc[32];
    Norm nm{nst, nw, nb, eps, layer}, none{nullptr, nullptr, nullptr, 0.f, 0};
    int lane = threadIdx.x & 31, nwarp = (gridDim.x * blockDim.x) >> 5;
    int wid = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int rows = mode == 2 ? N / 2 : N;
    int half = (mode != 2 && rows % 2 == 0 && rows / 2 >= nwarp) ? rows / 2 : 0;  // phase 2 pairs rows
    int todo = half ? half : rows;
    if (prefetch) {  // u does not depend on phase 1: start pulling this warp's phase-2 rows into L2 now
        size_t rb = (size_t)R * sizeof(W);  // bytes per row of u
        for (int row = wid; row < todo; row += nwarp)
            for (int j = 0; j < (mode == 2 || half ? 2 : 1); ++j) {
                const char* base = reinterpret_cast<const char*>(u + (size_t)(row + j * (mode == 2 ? rows : half)) * R);
                for (size_t o = (size_t)lane * 128; o < rb; o += 32 * 128)
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + o));
            }
    }
    if (p1warp)  // short rows of v: a warp per row (no block-level reduction)
        for (int row = wid; row < R; row += nwarp)
            warp_row<W, false>(x, v, nullptr, mid, T, K, R, 0, row, lane, nm, nullptr);
    else {
        int p1 = (R % 2 == 0 && R / 2 >= (int)gridDim.x) ? R / 2 : 0;  // two rows at a time when blocks take several
        for (int row = blockIdx.x; row < (p1 ? p1 : R); row += gridDim.x)
            block_row<W>(x, v, mid, T, K, R, row, red, nm, p1);
    }
    grid_barrier(bar);
    stats_begin(sacc, ost, T);
    double* sa = ost ? sacc : nullptr;
    if (stage) {
        const float4* src = reinterpret_cast<const float4*>(mid);
        float4* dst = reinterpret_cast<float4*>(smem);
        for (int i = threadIdx.x; i < T * R / 4; i += blockDim.x) dst[i] = __ldcg(src + i);
        __syncthreads();
        for (int row = wid; row < todo; row += nwarp)
            warp_row<W, false>(smem, u, bias, out, T, R, N, mode, row, lane, none, sa, half);
    } else {
        for (int row = wid; row < todo; row += nwarp)
            warp_row<W, true>(mid, u, bias, out, T, R, N, mode, row, lane, none, sa, half);
    }
    stats_end(sacc, ost, T);
}

__device__ double block_sum_d(double v, double* red) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < nw ? red[l] : 0.0;
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// x[t] = table[tok[t]] (+ pe[pos + t]); st (nslots, T, 2): slot 0 gets Σx, Σx² of the row, the others zero
// (the matmuls that update x accumulate into them during the step).
template <typename W>
__global__ void embed(const int* __restrict__ tok, const W* __restrict__ table, const unsigned short* td,
                      const unsigned short* tm, const float* __restrict__ pe,
                      const int* __restrict__ pos, float* __restrict__ x, int D, double* st, int nslots, int T) {
    pdl_launch();
    pdl_wait();
    __shared__ double red[32];
    int t = blockIdx.x;
    size_t id = (size_t)tok[t];
    int p = *pos + t;
    double s = 0.0, ss = 0.0;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v;
        if constexpr (IsQ<W>::v) v = deq1<W>(table, QS{td, tm}, id, i, D);
        else v = to_f(table[id * D + i]);
        if (pe) v += pe[(size_t)p * D + i];
        x[(size_t)t * D + i] = v;
        s += v;
        ss += (double)v * v;
    }
    for (int j = threadIdx.x; j < 2 * (nslots - 1); j += blockDim.x)
        st[((size_t)(1 + j / 2) * T + t) * 2 + (j & 1)] = 0.0;
    s = block_sum_d(s, red);
    ss = block_sum_d(ss, red);
    if (threadIdx.x == 0) { st[2 * t] = s; st[2 * t + 1] = ss; }
}

// Causal attention of query row t (position pos + t) over cache positions 0..pos + t, one block of 256 threads
// per (head, row); online softmax over chunks of ACH positions. grid (H, T); hd ≤ 128, hd % 4 == 0.
// Fused with the split of q|k|v rows, RoPE (rotate-half, use_rope) and the cache store: every block writes
// the T new keys/values of its kv group (the blocks of a group write identical values), then reads the cache.
template <bool CG>
__device__ __forceinline__ float ldf(const float* p) { return CG ? __ldcg(p) : *p; }

template <bool CG>
__device__ void attend(int h, int t, const float* qkv, const int* __restrict__ pos, const float* __restrict__ cs,
                       const float* __restrict__ sn, int use_rope, float* kc, float* vc, float scale,
                       float* __restrict__ out, int T, int H, int Hkv, int hd, int cap, int store) {
    __shared__ float sc[ACH];
    __shared__ float qs[128];
    __shared__ float part[256];
    __shared__ float red[32];
    int tid = threadIdx.x, nt = blockDim.x;
    int g = h / (H / Hkv), half = hd / 2, p0 = *pos, W = (H + 2 * Hkv) * hd;
    for (int e = tid; e < (store ? T * half : 0); e += nt) {  // store = 0: rope_store wrote them (long prompts)
        int j = e / half, i = e % half, p = p0 + j;
        const float* row = qkv + (size_t)j * W;
        int ks = (H + g) * hd, vs = (H + Hkv + g) * hd;
        float a = ldf<CG>(row + ks + i), b = ldf<CG>(row + ks + half + i);
        float* kd = kc + ((size_t)g * cap + p) * hd;
        float* vd = vc + ((size_t)g * cap + p) * hd;
        if (use_rope) {
            float c = cs[(size_t)p * half + i], s = sn[(size_t)p * half + i];
            kd[i] = a * c - b * s;
            kd[half + i] = b * c + a * s;
        } else {
            kd[i] = a;
            kd[half + i] = b;
        }
        vd[i] = ldf<CG>(row + vs + i);
        vd[half + i] = ldf<CG>(row + vs + half + i);
    }
    {
        const float* row = qkv + (size_t)t * W + h * hd;
        int p = p0 + t;
        for (int i = tid; i < half; i += nt) {
            float a = ldf<CG>(row + i), b = ldf<CG>(row + half + i);
            if (use_rope) {
                float c = cs[(size_t)p * half + i], s = sn[(size_t)p * half + i];
                qs[i] = a * c - b * s;
                qs[half + i] = b * c + a * s;
            } else {
                qs[i] = a;
                qs[half + i] = b;
            }
        }
    }
    __syncthreads();
    int n = p0 + t + 1;
    const float* K0 = kc + (size_t)g * cap * hd;
    const float* V0 = vc + (size_t)g * cap * hd;
    int G = nt / hd, grp = tid / hd, d = tid % hd;
    float m = -INF, l = 0.f, acc = 0.f;
    for (int c0 = 0; c0 < n; c0 += ACH) {
        int cn = min(ACH, n - c0);
        float mx = -INF;
        for (int s = tid; s < cn; s += nt) {
            const float* kr = K0 + (size_t)(c0 + s) * hd;
            float a = 0.f;
            for (int i = 0; i < hd; i += 4) {
                float4 k4 = *reinterpret_cast<const float4*>(kr + i);
                a += k4.x * qs[i] + k4.y * qs[i + 1] + k4.z * qs[i + 2] + k4.w * qs[i + 3];
            }
            a *= scale;
            sc[s] = a;
            mx = fmaxf(mx, a);
        }
        mx = block_max(mx, red);
        float mn = fmaxf(m, mx), sum = 0.f;
        for (int s = tid; s < cn; s += nt) { float e = expf(sc[s] - mn); sc[s] = e; sum += e; }
        sum = block_sum(sum, red);
        float corr = expf(m - mn);
        l = l * corr + sum;
        acc *= corr;
        m = mn;
        if (grp < G) {
            const float* vp = V0 + (size_t)c0 * hd + d;
            int s = grp;
            for (; s + 3 * G < cn; s += 4 * G) {
                float v0 = vp[(size_t)s * hd], v1 = vp[(size_t)(s + G) * hd];
                float v2 = vp[(size_t)(s + 2 * G) * hd], v3 = vp[(size_t)(s + 3 * G) * hd];
                acc += sc[s] * v0 + sc[s + G] * v1 + sc[s + 2 * G] * v2 + sc[s + 3 * G] * v3;
            }
            for (; s < cn; s += G) acc += sc[s] * vp[(size_t)s * hd];
        }
        __syncthreads();
    }
    if (grp < G) part[grp * hd + d] = acc;
    __syncthreads();
    if (tid < hd) {
        float s = 0.f;
        for (int gg = 0; gg < G; ++gg) s += part[gg * hd + tid];
        out[((size_t)t * H + h) * hd + tid] = s / l;
    }
    __syncthreads();
}

// The layers of a decode step in ONE launch: a persistent grid (every block resident; the launcher sizes it
// from the occupancy) runs, layer after layer, norm+QKV → RoPE+cache store+attention → Wo+residual →
// norm+gate/up+SwiGLU (GELU) → down+residual, with a grid-wide barrier between phases (4 per layer plus
// one between layers, where 5 launches were). Activations written inside the launch are read through L2
// (__ldcg): another multiprocessor's L1 may hold an older copy. Each block stages a matmul's input rows in
// shared memory once per phase (normalized there: the norm runs once per block, not in every warp), and
// its warps read them from there. Weights of one type W for all layers. Dynamic shared memory: T · max width.
// P: NP device pointers per layer: for qkv, wo, up, down (w, d, m, bias) each; attn norm (w, b); ffn norm (w, b).
#define NP 20
// hs = norm(x) (nm.w null: x as it is) for T rows of K, read through L2; the block's threads share the work.
__device__ __forceinline__ void stage(const float* x, int T, int K, const Norm& nm, float* hs) {
    __syncthreads();  // the previous phase's readers are done with hs
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
        float v = __ldcg(x + i);
        if (nm.w) {
            int t = i / K, k = i - t * K;
            float mu, r;
            norm_coef(nm, t, K, mu, r);
            v = (v - mu) * r * nm.w[k] + (nm.b ? nm.b[k] : 0.f);
        }
        hs[i] = v;
    }
    __syncthreads();
}

// A matrix of the layer table (its w, d, m pointers at p) of `rows` rows of K weights.
template <typename W>
__device__ __forceinline__ void l2_prefetch_mat(const unsigned long long* p, size_t rows, int K) {
    if constexpr (IsQ<W>::v) {
        size_t nb = rows * (size_t)(K >> 5);
        l2_prefetch(p[0], nb * (Same<W, q8_0>::v ? 32 : 16));
        l2_prefetch(p[1], nb * 2);
        l2_prefetch(p[2], nb * 2);  // Q4_1's minimums (null otherwise)
    } else {
        l2_prefetch(p[0], rows * (size_t)K * sizeof(W));
    }
}

// pf = 1: each layer's matrices are pulled into L2 during the layer before (layer 0 at the start); 0: not.
template <typename W>
__global__ void layers(const unsigned long long* __restrict__ P, int L, float* x, float* qkv, float* att,
                       float* act, double* st, const int* __restrict__ pos, const float* __restrict__ cs,
                       const float* __restrict__ sn, int use_rope, float* kc0, float* vc0, long long lstride,
                       float scale, int T, int D, int H, int Hkv, int hd, int cap, int F, int up_mode, int layer,
                       float eps1, float eps2, int* bar, int pf) {
    pdl_launch();
    pdl_wait();
    extern __shared__ float hs[];
    __shared__ double sacc[32];
    int lane = threadIdx.x & 31, nwarp = (gridDim.x * blockDim.x) >> 5;
    int wid = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int Q = H * hd, NQKV = (H + 2 * Hkv) * hd, NUP = up_mode == 2 ? 2 * F : F, UPR = up_mode == 2 ? F : NUP;
    Norm none{nullptr, nullptr, nullptr, 0.f, 0};
    for (int l = 0; l < L; ++l) {
        const unsigned long long* p = P + (size_t)l * NP;
        for (int j = (pf && l == 0) ? 0 : 1; pf && j < 2 && l + j < L; ++j) {
            const unsigned long long* pn = p + (size_t)j * NP;
            l2_prefetch_mat<W>(pn, NQKV, D);
            l2_prefetch_mat<W>(pn + 4, D, Q);
            l2_prefetch_mat<W>(pn + 8, NUP, D);
            l2_prefetch_mat<W>(pn + 12, D, F);
        }
#define WP(i) reinterpret_cast<const W*>(p[i])
#define SP(i) QS{reinterpret_cast<const unsigned short*>(p[(i) + 1]), reinterpret_cast<const unsigned short*>(p[(i) + 2])}
#define FP(i) reinterpret_cast<const float*>(p[i])
        double* s0 = st + (size_t)(2 * l) * T * 2;
        double* s1 = s0 + (size_t)T * 2;
        double* s2 = s1 + (size_t)T * 2;
        Norm n1{s0, FP(16), FP(17), eps1, layer}, n2{s1, FP(18), FP(19), eps2, layer};
        stage(x, T, D, n1, hs);
        for (int row = wid; row < NQKV; row += nwarp)
            warp_row<W, false>(hs, WP(0), FP(3), qkv, T, D, NQKV, 0, row, lane, none, nullptr, 0, SP(0));
        grid_barrier(bar);
        float* kc = kc0 + (size_t)l * lstride;
        float* vc = vc0 + (size_t)l * lstride;
        for (int i = blockIdx.x; i < H * T; i += gridDim.x)
            attend<true>(i % H, i / H, qkv, pos, cs, sn, use_rope, kc, vc, scale, att, T, H, Hkv, hd, cap, 1);
        grid_barrier(bar);
        stage(att, T, Q, none, hs);
        stats_begin(sacc, s1, T);
        for (int row = wid; row < D; row += nwarp)
            warp_row<W, false>(hs, WP(4), FP(7), x, T, Q, D, 1, row, lane, none, sacc, 0, SP(4));
        stats_end(sacc, s1, T);
        grid_barrier(bar);
        stage(x, T, D, n2, hs);
        for (int row = wid; row < UPR; row += nwarp)
            warp_row<W, false>(hs, WP(8), FP(11), act, T, D, NUP, up_mode, row, lane, none, nullptr, 0, SP(8));
        grid_barrier(bar);
        stage(act, T, F, none, hs);
        stats_begin(sacc, s2, T);
        for (int row = wid; row < D; row += nwarp)
            warp_row<W, false>(hs, WP(12), FP(15), x, T, F, D, 1, row, lane, none, sacc, 0, SP(12));
        stats_end(sacc, s2, T);
        if (l + 1 < L) grid_barrier(bar);
#undef WP
#undef SP
#undef FP
    }
}

extern "C" {

// RMSNorm (layer = 0): x / sqrt(mean(x²) + eps) · w;  LayerNorm (layer = 1): (x − mean) / sqrt(var + eps) · w + b
__global__ void layer_norm(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                     float eps, float* __restrict__ out, int D, int layer) {
    pdl_launch();
    pdl_wait();
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * D;
    float mu = 0.f;
    if (layer) {
        float s = 0.f;
        for (int i = threadIdx.x; i < D; i += blockDim.x) s += xr[i];
        mu = block_sum(s, red) / D;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) { float d = xr[i] - mu; ss += d * d; }
    float r = 1.f / sqrtf(block_sum(ss, red) / D + eps);
    float* o = out + (size_t)blockIdx.x * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) o[i] = (xr[i] - mu) * r * w[i] + (b ? b[i] : 0.f);
}

// Split fused q|k|v rows: q → q (T, H, hd); k, v → the layer's cache (Hkv, cap, hd) at position pos + t.
// With use_rope: rotate-half RoPE on q and k.  grid (T, H + Hkv)
__global__ void rope_store(const float* __restrict__ qkv, const int* __restrict__ pos, const float* __restrict__ cs,
                           const float* __restrict__ sn, int use_rope, float* __restrict__ q, float* __restrict__ kc,
                           float* __restrict__ vc, int H, int Hkv, int hd, int cap) {
    pdl_launch();
    pdl_wait();
    int t = blockIdx.x, h = blockIdx.y, p = *pos + t, half = hd / 2;
    const float* row = qkv + (size_t)t * (H + 2 * Hkv) * hd;
    float* dst;
    int src;
    if (h < H) {
        src = h * hd;
        dst = q + ((size_t)t * H + h) * hd;
    } else {
        int g = h - H;
        src = (H + g) * hd;
        dst = kc + ((size_t)g * cap + p) * hd;
        float* vd = vc + ((size_t)g * cap + p) * hd;
        int vs = (H + Hkv + g) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) vd[i] = row[vs + i];
    }
    if (use_rope) {
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float a = row[src + i], bb = row[src + half + i];
            float c = cs[(size_t)p * half + i], s = sn[(size_t)p * half + i];
            dst[i] = a * c - bb * s;
            dst[half + i] = bb * c + a * s;
        }
    } else {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = row[src + i];
    }
}

// grid (H, T): see attend.
__global__ void attention(const float* __restrict__ qkv, const int* __restrict__ pos, const float* __restrict__ cs,
                          const float* __restrict__ sn, int use_rope, float* kc, float* vc, float scale,
                          float* __restrict__ out, int T, int H, int Hkv, int hd, int cap, int store) {
    pdl_launch();
    pdl_wait();
    attend<false>(blockIdx.x, blockIdx.y, qkv, pos, cs, sn, use_rope, kc, vc, scale, out, T, H, Hkv, hd, cap, store);
}

__global__ void advance(int* pos, int T) {
    pdl_launch();
    pdl_wait();
    if (threadIdx.x == 0) *pos += T;
}

// Greedy step end: token = argmax(logits row 0); tok[0] = token, hist[pos + T] = token, pos += T.
// Blocks reduce slices; the last block to finish (count) reduces their partials (pval, pidx) and resets count.
__global__ void argmax_step(const float* __restrict__ logits, int V, int* tok, int* pos, int* hist, int T,
                            float* pval, int* pidx, unsigned int* count) {
    pdl_launch();
    pdl_wait();
    __shared__ float redf[32];
    __shared__ int redi[32];
    __shared__ bool last;
    float bv = -INF;
    int bi = 0x7fffffff;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += gridDim.x * blockDim.x) {
        float v = logits[i];
        if (v > bv) { bv = v; bi = i; }
    }
    block_argmax(bv, bi, redf, redi);
    if (threadIdx.x == 0) {
        pval[blockIdx.x] = bv;
        pidx[blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(count, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    bv = -INF;
    bi = 0x7fffffff;
    for (int i = threadIdx.x; i < (int)gridDim.x; i += blockDim.x) {
        float v = __ldcg(pval + i);
        int j = __ldcg(pidx + i);
        if (v > bv || (v == bv && j < bi)) { bv = v; bi = j; }
    }
    block_argmax(bv, bi, redf, redi);
    if (threadIdx.x == 0) {
        *count = 0u;
        int p = *pos;
        tok[0] = bi;
        hist[p + T] = bi;
        *pos = p + T;
    }
}

// Speculative verification over rows 0..K of P (V wide) against draft[0..K−1], in one block.
// greedy: P holds (penalized) logits; accept while argmax P[i] == draft[i]; next = argmax of the first
//         mismatching row, or of row K.
// sampling: P holds probabilities; accept draft[i] while u[i] < min(1, P[i][x] / Q[i][x]) (Q null: one-hot
//         drafts, q = 1); on the first rejection draw from norm(max(0, P[i] − Q[i])) (Q null: P[i] with x
//         removed; P[i] itself if that is empty), else from P[K]; the draw uses u[tests made] and numpy's
//         rule (first index whose cumulative sum / total exceeds u).
// result[0] = accepted drafts, result[1] = next token.
__global__ void verify(const float* __restrict__ P, int V, const int* __restrict__ draft, int K,
                       const float* __restrict__ Q, const float* __restrict__ u, int greedy, int* result) {
    pdl_launch();
    pdl_wait();
    __shared__ float redf[32];
    __shared__ int redi[32];
    __shared__ double scan[1024];
    int tid = threadIdx.x, nt = blockDim.x;
    if (greedy) {
        for (int i = 0; i <= K; ++i) {
            const float* row = P + (size_t)i * V;
            float bv = -INF;
            int bi = 0x7fffffff;
            for (int v = tid; v < V; v += nt) { float x = row[v]; if (x > bv) { bv = x; bi = v; } }
            block_argmax(bv, bi, redf, redi);
            if (i == K || bi != draft[i]) {
                if (tid == 0) { result[0] = i; result[1] = bi; }
                return;
            }
        }
        return;
    }
    int i = 0;
    for (; i < K; ++i) {
        int x = draft[i];
        float px = P[(size_t)i * V + x], qx = Q ? Q[(size_t)i * V + x] : 1.f;
        float ratio = qx > 0.f ? px / qx : 1.f;
        if (!(u[i] < fminf(1.f, ratio))) break;
    }
    const float* p = P + (size_t)i * V;
    const float* qr = (i < K && Q) ? Q + (size_t)i * V : nullptr;
    int x = i < K ? draft[i] : -1;
    double uu = (double)u[i < K ? i + 1 : K];
    int seg = (V + nt - 1) / nt, b0 = min(V, tid * seg), b1 = min(V, b0 + seg);
    for (int pass = 0; pass < 2; ++pass) {
        bool resid = pass == 0 && i < K;
        double s = 0.0;
        for (int v = b0; v < b1; ++v) {
            double r = p[v];
            if (resid) r = qr ? fmax(0.0, r - (double)qr[v]) : (v == x ? 0.0 : r);
            s += r;
        }
        __syncthreads();
        scan[tid] = s;
        __syncthreads();
        for (int o = 1; o < nt; o <<= 1) {
            double add = tid >= o ? scan[tid - o] : 0.0;
            __syncthreads();
            scan[tid] += add;
            __syncthreads();
        }
        double total = scan[nt - 1];
        if (!(total > 0.0)) continue;  // empty residual: draw from p itself
        double c = tid > 0 ? scan[tid - 1] : 0.0;
        if (c / total <= uu && scan[tid] / total > uu) {
            int last = -1;
            for (int v = b0; v < b1; ++v) {
                double r = p[v];
                if (resid) r = qr ? fmax(0.0, r - (double)qr[v]) : (v == x ? 0.0 : r);
                if (r > 0.0) last = v;
                c += r;
                if (c / total > uu) break;
            }
            result[0] = i;
            result[1] = last;  // rounding never leaves the segment without its token
        }
        return;
    }
}

}  // extern "C"
"""

WEIGHT_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "Q8_0": "q8_0", "Q4_0": "q4_0",
                "Q4_1": "q4_1"}
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
LAYER_POINTERS = 20  # NP in the source: pointers per layer in the persistent layers kernel's table
SMEM_MAX = 96 * 1024  # dynamic shared memory the fused low-rank kernel may take (phase 2's r-vectors)
ARGMAX_BLOCKS = 48
LOWRANK_WARP_K = 1024  # phase 1 of the fused low-rank kernel: a warp per row of V up to this width
NULL = np.uint64(0)  # an 8-byte zero: a null pointer argument
TEMPLATES = ("gemv", "lowrank", "embed", "layers")
FLOAT_ONLY = ("lowrank",)


class _Attr(ctypes.Structure):  # CUlaunchAttribute (cuda.h): an id, padding, a 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("nattrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_CTYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint32): ctypes.c_uint32,
           np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.float32): ctypes.c_float}


class _Fn:
    """A kernel of the module, called as CuPy's (grid, block, args, shared_mem); while its Kernels' pdl is set
    (graph capture of a step), launched through the driver's cuLaunchKernelEx with programmatic stream
    serialization (programmatic dependent launch: see pdl_launch/pdl_wait in the source). CuPy has no launch
    attributes, so the launch goes through ctypes to libcuda, which CuPy has loaded already."""

    _launch = None

    def __init__(self, ks: "Kernels", f):
        self.ks, self.f = ks, f
        self.ptr = getattr(f, "ptr", None) or f.kernel.ptr

    def __call__(self, grid, block, args, shared_mem: int = 0):
        if not self.ks.pdl:
            self.f(grid, block, args, shared_mem=shared_mem)
            return
        if _Fn._launch is None:
            lib = ctypes.CDLL("libcuda.so.1")
            _Fn._launch = lib.cuLaunchKernelEx
            _Fn._launch.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.c_void_p]
            _Fn._launch.restype = ctypes.c_int
        vals = [ctypes.c_void_p(a.data.ptr) if hasattr(a, "data") and hasattr(a.data, "ptr")
                else _CTYPES[np.asarray(a).dtype](a) for a in args]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        g, b = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        cfg = _Config((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_mem,
                      self.ks.cp.cuda.get_current_stream().ptr, ctypes.pointer(attr), 1)
        rc = _Fn._launch(ctypes.byref(cfg), self.ptr, params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc}")


class QMat:
    """A quantized matrix on the device, as stored (minirt.linear.Quant's qn, d, m: the GGUF blocks with their
    scales split off): q (rows, K) int8 (Q8_0) or (rows, K/2) uint8 (Q4_0, Q4_1); d, m (rows, K/32) float16 bits."""

    def __init__(self, cp, qtype: str, q, d, m, shape):
        self.qtype, self.shape = qtype, tuple(shape)
        self.q, self.d = cp.asarray(q), cp.asarray(d)
        self.m = cp.asarray(m) if qtype == "Q4_1" else None

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)


class Kernels:
    """The compiled module and launchers. Every launch goes to the current CuPy stream."""

    def __init__(self):
        import cupy as cp
        self.cp = cp
        names = [f"{k}<{t}>" for k in TEMPLATES for w, t in WEIGHT_TYPES.items()
                 if not (k in FLOAT_ONLY and w in QUANT_TYPES)]
        self.module = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=names)
        self._f = {}
        dev = cp.cuda.Device()
        self.sms = dev.attributes["MultiProcessorCount"]
        self.l2 = dev.attributes["L2CacheSize"]
        self.prefetch = False  # fused low-rank: pull U into L2 during phase 1 (measured: no gain; off)
        self._resident: dict = {}
        self._smem_set: dict = {}
        self._argmax = None  # partials of the multi-block argmax (fixed pointers: graph-safe)
        self.pdl = False  # launch with programmatic dependent launch (the backend sets it while capturing)

    def fn(self, name: str, wtype=None):
        key = name if wtype is None else f"{name}<{WEIGHT_TYPES[wtype]}>"
        f = self._f.get(key)
        if f is None:
            f = self._f[key] = _Fn(self, self.module.get_function(key))
        return f

    @staticmethod
    def wtype(a) -> str:
        if isinstance(a, QMat):
            return a.qtype
        return {"float16": "float16", "float32": "float32"}.get(str(a.dtype), "bfloat16")

    def _w(self, w) -> tuple:
        """A matrix's kernel arguments: (values or quants, scales, minimums)."""
        if isinstance(w, QMat):
            return w.q, w.d, self._p(w.m)
        return w, NULL, NULL

    # ---- launchers ------------------------------------------------------------------------------------
    def _norm_args(self, nst, norm, layer, ost):
        nw, nb, eps = norm if norm is not None else (None, None, 0.0)
        return (self._p(nst), self._p(nw), self._p(nb), self.cp.float32(eps), self._i(int(layer)), self._p(ost))

    def gemv(self, x, w, bias, out, T: int, mode: int = 0, nst=None, norm=None, layer: bool = False, ost=None):
        """out = epilogue(h · wᵀ + bias); h = x, or norm(x) with norm = (weight, bias, eps) and nst the (T, 2)
        float64 statistics of x; ost: (T, 2) statistics to which the stored outputs are added (or None)."""
        N, K = w.shape
        rows = N // 2 if mode == 2 else N
        tall = mode != 2 and rows >= 8192 and rows % 2 == 0  # gemv_pair in the source
        todo = rows // 2 if tall else rows
        blocks = (todo + 7) // 8
        if tall:  # one wave of resident blocks whose warps loop over the rows (latency-bound waves otherwise)
            blocks = min(blocks, self.resident_blocks("gemv", self.wtype(w), 4))
        self.fn("gemv", self.wtype(w))((blocks,), (256,), (x, *self._w(w), self._p(bias), out, self._i(T), self._i(K),
                                                                    self._i(N), self._i(mode),
                                                                    *self._norm_args(nst, norm, layer, ost)))

    def lowrank_grid(self, wtype: str, smem: int) -> int:
        """Blocks of 256 threads resident at once with `smem` bytes of dynamic shared memory each (the grid
        barrier needs every block running)."""
        key = (wtype, smem)
        g = self._resident.get(key)
        if g is None:
            f = self.fn("lowrank", wtype)
            per_sm = 1
            try:
                from cupy.cuda import driver
                ptr = f.ptr
                if not self._smem_set.get(wtype):
                    driver.funcSetAttribute(ptr, 8, SMEM_MAX)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                    self._smem_set[wtype] = True
                per_sm = max(1, min(4, driver.occupancyMaxActiveBlocksPerMultiprocessor(ptr, 256, smem)))
            except Exception:  # noqa: BLE001
                pass
            g = self._resident[key] = per_sm * self.sms
        return g

    def lowrank(self, x, v, u, bias, mid, out, bar, T: int, mode: int = 0, nst=None, norm=None, layer=False,
                ost=None):
        """The fused low-rank matmul; nst, norm, layer, ost as in gemv."""
        R, K = v.shape
        N = u.shape[0]
        rows = N // 2 if mode == 2 else N
        wt = self.wtype(v)
        smem = T * R * 4
        stage = smem <= SMEM_MAX
        smem = smem if stage else 0
        p1warp = K <= LOWRANK_WARP_K
        blocks = max(1, min(self.lowrank_grid(wt, smem), max((R + 7) // 8 if p1warp else R, (rows + 7) // 8)))
        self.fn("lowrank", wt)((blocks,), (256,), (x, v, u, self._p(bias), mid, out, bar, self._i(T), self._i(K),
                                                     self._i(R), self._i(N), self._i(mode), self._i(int(stage)),
                                                     *self._norm_args(nst, norm, layer, ost), self._i(int(p1warp)),
                                                     self._i(int(self.prefetch and u.nbytes <= self.l2 // 2))),
                               shared_mem=smem)

    def embed(self, tok, table, pe, pos, x, T: int, st):
        D = table.shape[1]
        self.fn("embed", self.wtype(table))((T,), (256,), (tok, *self._w(table), self._p(pe), pos, x, self._i(D), st,
                                                           self._i(st.shape[0]), self._i(T)))

    def norm(self, x, w, b, eps: float, out, T: int, layer: bool):
        D = x.shape[-1]
        self.fn("layer_norm")((T,), (256,), (x, w, self._p(b), self.cp.float32(eps), out, self._i(D), self._i(int(layer))))

    def rope_store(self, qkv, pos, cos, sin, use_rope, q, kc, vc, T, H, Hkv, hd, cap):
        self.fn("rope_store")((T, H + Hkv), (max(32, min(128, hd // 2)),),
                              (qkv, pos, cos, sin, self._i(int(use_rope)), q, kc, vc, self._i(H), self._i(Hkv),
                               self._i(hd), self._i(cap)))

    def attention(self, qkv, pos, cos, sin, use_rope, kc, vc, scale, out, T, H, Hkv, hd, cap, store: bool = True):
        self.fn("attention")((H, T), (256,), (qkv, pos, cos, sin, self._i(int(use_rope)), kc, vc,
                                             self.cp.float32(scale), out, self._i(T), self._i(H), self._i(Hkv),
                                             self._i(hd), self._i(cap), self._i(int(store))))

    def resident_blocks(self, name: str, wtype: str, cap: int = 2, smem: int = 0) -> int:
        """Blocks of 256 threads that fit on the device at once (at most cap per multiprocessor) with `smem` bytes
        of dynamic shared memory each: the size of a persistent grid whose blocks meet at grid-wide barriers."""
        key = (name, wtype, cap, smem)
        g = self._resident.get(key)
        if g is None:
            f = self.fn(name, wtype)
            per_sm = 1
            try:
                from cupy.cuda import driver
                ptr = f.ptr
                if smem > 48 * 1024 and not self._smem_set.get((name, wtype)):
                    driver.funcSetAttribute(ptr, 8, SMEM_MAX)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                    self._smem_set[(name, wtype)] = True
                per_sm = max(1, min(cap, driver.occupancyMaxActiveBlocksPerMultiprocessor(ptr, 256, smem)))
            except Exception:  # noqa: BLE001
                pass
            g = self._resident[key] = per_sm * self.sms
        return g

    def layers(self, table, wtype: str, L: int, x, qkv, att, act, st, pos, cos, sin, use_rope, kc, vc, scale, T, D,
               H, Hkv, hd, cap, F, up_mode, layer_norm, eps1, eps2, bar, per_sm: int = 2, pf: int = 0):
        """Every layer of a step in one persistent launch (see the source); table: (layers, LAYER_POINTERS) uint64;
        pf: the L2 prefetch of the next layer (see the source)."""
        smem = self.layers_smem(T, D, H * hd, F)
        blocks = self.resident_blocks("layers", wtype, per_sm, smem)
        self.fn("layers", wtype)((blocks,), (256,), (table, self._i(L), x, qkv, att, act, st, pos, cos, sin,
                                                    self._i(int(use_rope)), kc, vc, self.cp.int64(kc[0].size),
                                                    self.cp.float32(scale), self._i(T), self._i(D), self._i(H),
                                                    self._i(Hkv), self._i(hd), self._i(cap), self._i(F),
                                                    self._i(up_mode), self._i(int(layer_norm)),
                                                    self.cp.float32(eps1), self.cp.float32(eps2), bar,
                                                    self._i(pf)),
                                 shared_mem=smem)

    @staticmethod
    def layers_smem(T: int, D: int, Q: int, F: int) -> int:
        """Dynamic shared memory of the layers kernel (a block's staged input rows); ≤ SMEM_MAX to run it."""
        return T * max(D, Q, F) * 4

    def advance(self, pos, T: int):
        self.fn("advance")((1,), (32,), (pos, self._i(T)))

    def argmax_step(self, logits, V: int, tok, pos, hist, T: int):
        if self._argmax is None:
            cp = self.cp
            self._argmax = (cp.empty(ARGMAX_BLOCKS, cp.float32), cp.empty(ARGMAX_BLOCKS, cp.int32),
                            cp.zeros(1, cp.uint32))
        self.fn("argmax_step")((ARGMAX_BLOCKS,), (256,), (logits, self._i(V), tok, pos, hist, self._i(T), *self._argmax))

    def verify(self, P, V: int, draft, K: int, Q, u, greedy: bool, result):
        self.fn("verify")((1,), (1024,), (P, self._i(V), draft, self._i(K), self._p(Q), u, self._i(int(greedy)), result))

    def _i(self, v: int):
        return self.cp.int32(v)

    @staticmethod
    def _p(a):
        """A device array, or a null pointer for None."""
        return NULL if a is None else a


_KERNELS: Kernels | None = None


def kernels() -> Kernels:
    """The module, compiled once per process (NVRTC; CuPy caches the binary on disk)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = Kernels()
    return _KERNELS
