// Shared by attention.cu and attention_decode.cu: the paged-attention arguments and the merge of
// split-key partials (the Q8_0 cache's turn: kv_q8.cuh).
#pragma once
#include "kv_q8.cuh"

// What attn_impl and attn_dec_impl read (cuda_attention.py passes them in this order): kc/vc are
// __half (f16 cache) or int8_t (Q8_0: levels, with the half scales ks/vs; nullptr for f16).
#define ATTN_IMPL_PARAMS                                                                                 \
    const float* __restrict__ q, const void* __restrict__ kc, const void* __restrict__ vc,               \
        const __half* __restrict__ ks, const __half* __restrict__ vs, float* __restrict__ out,           \
        const int* __restrict__ q_starts, const int* __restrict__ positions,                              \
        const int* __restrict__ ctx_lens, const int* __restrict__ block_tables, int max_blocks,           \
        int block_size, int Hq, int Hkv, int Dk, int Dv, float scale, int window,                         \
        const float* __restrict__ sinks, float softcap, int n_splits, float* __restrict__ part


// One warp merges the n_splits partials p[split][acc (Dv), m, l] of a (token, q head) row into its
// output o; a sink logit (if any) joins the denominator. Loads bypass L1 (__ldcg): attn_dec's
// merging CTA reads partials other CTAs wrote during the same launch. Lane j holds the m and l of
// splits j, j + 32, ... (at most MAX_SPLITS), all loaded before any is used; the splits' weights
// go through the warp's wsh [MAX_SPLITS] in shared memory. Slices fill from the first, so only
// those up to the last that saw a key are read (a short context fills few), and every column
// block's loads of 8 slices issue before any is used: a round trip per slice, then per column
// block, is what made this merge 4-11 us per layer (H100 traces). CB: column blocks of 32 the
// caller may need (Dv <= 32 CB).
#define MAX_SPLITS 256
template <int CB>
__device__ void merge_split_row(const float* __restrict__ p, float* __restrict__ o, const float* sink, int Dv,
                                int n_splits, int lane, float* wsh) {
    constexpr int PER = MAX_SPLITS / 32;
    const int stride = Dv + 2;
    float ms[PER], ls[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int sp = lane + 32 * i;
        ms[i] = sp < n_splits ? __ldcg(p + sp * stride + Dv) : -INFINITY;
        ls[i] = sp < n_splits ? __ldcg(p + sp * stride + Dv + 1) : 0.f;
    }
    float mx = sink ? *sink : -INFINITY;
    int last = -1;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        mx = fmaxf(mx, ms[i]);
        if (ms[i] != -INFINITY) last = lane + 32 * i;
    }
    const float M = warp_max(mx);
    float lsum = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const float w = ms[i] != -INFINITY ? __expf(ms[i] - M) : 0.f;  // M = -inf only if every ms is
        lsum = fmaf(ls[i], w, lsum);
        if (lane + 32 * i < n_splits) wsh[lane + 32 * i] = w;
    }
    const float L = warp_sum(lsum) + (sink ? __expf(*sink - M) : 0.f);
    const float inv = L > 0.f ? 1.f / L : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) last = max(last, __shfl_xor_sync(FULL_MASK, last, off));
    const int live = last + 1;
    __syncwarp();
    float a[CB];
#pragma unroll
    for (int c = 0; c < CB; ++c) a[c] = 0.f;
    for (int s0 = 0; s0 < live; s0 += 8) {
        float v[CB][8];
#pragma unroll
        for (int c = 0; c < CB; ++c) {
            const int d = min(32 * c + lane, Dv - 1);  // lanes past Dv read a valid column, store nothing
#pragma unroll
            for (int j = 0; j < 8; ++j)
                v[c][j] = 32 * c < Dv ? __ldcg(p + min(s0 + j, live - 1) * stride + d) : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float wj = s0 + j < live ? wsh[s0 + j] : 0.f;
#pragma unroll
            for (int c = 0; c < CB; ++c) a[c] = fmaf(v[c][j], wj, a[c]);
        }
    }
    __syncwarp();  // wsh is the warp's again for its next row
#pragma unroll
    for (int c = 0; c < CB; ++c)
        if (32 * c + lane < Dv) o[32 * c + lane] = a[c] * inv;
}

// ORCD_FUSE_ATTN_Q8 (Dv % 32 == 0): a row merge_split_row has just written (each lane reads back
// its own values) rounded to int8 a 32-block, levels and scales as quantize_x8 writes them, for the
// output projection's int8 GEMV. attn_combine always can; attn_dec's and attn_decm's own merges only
// in a build with ORCD_FUSE_ATTN_Q8=1 (tuning.py, compile-time, on by default), since the code alone
// costs registers: several attn_dec variants near their limit spill with it.
#ifndef ORCD_FUSE_ATTN_Q8
#define ORCD_FUSE_ATTN_Q8 0
#endif
__device__ __forceinline__ void q8_store_row(const float* o, int8_t* oq, float* od, int Dv, int lane) {
#pragma unroll 1
    for (int c = 0; 32 * c < Dv; ++c) q8_store_warp(o[32 * c + lane], oq, od, c, lane);
}

// attn_dec and attn_decm: the NW warps' online-softmax states of one query row merged at one output
// dim into the row's max M, denominator L and unnormalised sum A (a warp that saw no key adds
// nothing). ms / ls: the warps' m and l of the row, mw apart; as: their sums at this dim, aw apart.
template <int NW>
__device__ __forceinline__ void merge_warp_states(const float* ms, const float* ls, int mw, const float* as, int aw,
                                                  float& M, float& L, float& A) {
    M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, ms[w * mw]);
    L = 0.f;
    A = 0.f;
    if (M != -INFINITY) {
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            if (ms[w * mw] == -INFINITY) continue;
            const float f = __expf(ms[w * mw] - M);
            L = fmaf(ls[w * mw], f, L);
            A = fmaf(as[w * aw], f, A);
        }
    }
}

// A one-slice row's output A / L, the sink logit (if any) joining the denominator (split steps:
// merge_split_row); 0 where nothing was visible.
__device__ __forceinline__ float normalised_row(float M, float L, float A, const float* sinks, int h) {
    float f = 1.f;
    if (sinks) {
        const float sk = sinks[h];
        const float mf = fmaxf(M, sk);
        f = __expf(M - mf);
        L = L * f + __expf(sk - mf);
    }
    return L > 0.f ? A * f / L : 0.f;
}

// A merged row's value at dim d (attn_dec, attn_decm): with several key slices into this slice's
// partial [acc..., m, l] (m and l by dim 0's thread), else straight to the output row.
__device__ __forceinline__ void store_slice_row(float* __restrict__ part, float* __restrict__ out, size_t t, int Hq,
                                                int h, int split, int n_splits, int D, int d, float val, float M,
                                                float L) {
    if (n_splits > 1) {
        float* po = part + ((t * Hq + h) * n_splits + split) * (D + 2);
        po[d] = val;
        if (d == 0) { po[D] = M; po[D + 1] = L; }
    } else {
        out[(t * Hq + h) * D + d] = val;
    }
}

// The last of a (sequence, kv head)'s n_splits CTAs to finish (attn_dec, attn_decm: 4 warps) merges
// all their partials, a warp per q head, and resets the counter for the next launch, so a graph
// replays it as captured. Each CTA's partial writes are fenced before it counts itself.
template <int CB>
__device__ void attn_dec_merge(const float* __restrict__ part, float* __restrict__ out,
                               const float* __restrict__ sinks, int* counter, int t, int kvh, int G, int Hq,
                               int Dv, int n_splits, int8_t* oq, float* od) {
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == n_splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    __shared__ float wsh[4][MAX_SPLITS];  // attn_dec's 4 warps
    for (int g = threadIdx.x >> 5; g < G; g += blockDim.x >> 5) {
        const size_t row = (size_t)t * Hq + kvh * G + g;
        merge_split_row<CB>(part + row * n_splits * (Dv + 2), out + row * Dv, sinks ? sinks + (row % Hq) : nullptr,
                            Dv, n_splits, threadIdx.x & 31, wsh[threadIdx.x >> 5]);
#if ORCD_FUSE_ATTN_Q8
        if (oq) q8_store_row(out + row * Dv, oq + row * Dv, od + row * Dv / 32, Dv, threadIdx.x & 31);
#endif
    }
    if (threadIdx.x == 0) *counter = 0;
}
