// Logits -> token on the GPU: only a token id and its logprob per row come back to the host.
//
// sample_rows: one 1024-thread CTA per row of logits [R, V]. Per row:
//   0. a row with a bitmask (grammar constraints, allowed / banned ids: bit t % 32 of word t / 32
//      of its row of `bits`, RowParams.mask_row; -1: none) sees its disallowed tokens as -inf
//      from the start, so everything below, the logprobs included, is of the masked distribution;
//   1. raw max and log-sum-exp (for the returned logprob: log p of the token under the model's
//      unfiltered temperature-1 distribution), while copying the row to `work`;
//   2. repetition / presence / frequency penalties on `work` (a per-row list of distinct token
//      ids with their generated counts);
//   3. temperature 0: argmax (lowest index on ties). Otherwise, on z = work / T, the filters in
//      this order: top-k, top-p (nucleus over the top-k renormalised mass), min-p (relative to
//      the most likely token). Each filter is a threshold "keep value >= t"; top-k and top-p
//      find theirs exactly by 4-pass radix select over order-preserving 32-bit keys (counts for
//      top-k, probability mass for top-p), so nothing is sorted and no candidate list is built;
//   4. a uniform from Philox4x32-10 (key = the request's seed, counter = the row's token index)
//      picks the token by inverse CDF over the kept set: per-thread contiguous chunks, a block
//      scan of chunk sums, and one thread walks the chunk that holds the draw.
//   5. optionally the n_top most likely tokens (raw logprobs), by n_top arg-max passes.
// Ties at a threshold keep every tied token.
#include "common.cuh"

#define THREADS 1024

struct RowParams {  // 16 words per row, filled by the host
    float temperature;
    int top_k;
    float top_p;
    float min_p;
    unsigned seed_lo, seed_hi, ctr_lo, ctr_hi;
    float rep, presence, frequency;
    int pen_off, pen_n;
    int mask_row;  // row of `bits` holding this row's allowed tokens; -1: all allowed
    int pad1, pad2;
};

__device__ __forceinline__ bool allowed(const unsigned* __restrict__ m, int i) {
    return m == nullptr || ((m[i >> 5] >> (i & 31)) & 1u);
}

__device__ __forceinline__ unsigned fkey(float f) {  // order-preserving float -> uint
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ void philox_round(unsigned& c0, unsigned& c1, unsigned& c2, unsigned& c3,
                                             unsigned k0, unsigned k1) {
    const unsigned long long p0 = (unsigned long long)0xD2511F53u * c0;
    const unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c2;
    const unsigned hi0 = (unsigned)(p0 >> 32), lo0 = (unsigned)p0;
    const unsigned hi1 = (unsigned)(p1 >> 32), lo1 = (unsigned)p1;
    const unsigned n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
}

// Philox4x32-10 (Salmon et al., SC'11): first output word -> uniform in [0, 1).
__device__ float philox_uniform(unsigned seed_lo, unsigned seed_hi, unsigned ctr_lo, unsigned ctr_hi) {
    unsigned c0 = ctr_lo, c1 = ctr_hi, c2 = 0x6f726364u /* "orcd" stream tag */, c3 = 0;
    unsigned k0 = seed_lo, k1 = seed_hi;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        philox_round(c0, c1, c2, c3, k0, k1);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return (c0 >> 8) * (1.0f / 16777216.0f);
}

// Block arg-max of (value, -index): largest value, lowest index on ties. Only elements whose
// (value, index) is strictly "below" (lim_v, lim_i) in that order count (for top-n passes).
__device__ void block_argmax(const float* __restrict__ x, int V, float lim_v, int lim_i, float* out_v,
                             int* out_i, float* sv, int* si, const unsigned* __restrict__ m = nullptr) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = allowed(m, i) ? x[i] : -INFINITY;
        const bool below = v < lim_v || (v == lim_v && i > lim_i);
        if (below && (v > bv || (v == bv && i < bi))) { bv = v; bi = i; }
    }
    argmax_reduce(bv, bi, out_v, out_i, sv, si);
}

// Radix select over keys of x (kept: key >= floor_key). MASS = false: the key of the k-th largest
// element (by count). MASS = true: the largest key t such that the probability mass
// sum exp((x - m) * inv_t) over kept elements with key >= t reaches `target`.
template <bool MASS>
__device__ unsigned radix_select(const float* __restrict__ x, int V, unsigned floor_key, float target_or_k,
                                 float m, float inv_t, float* hist, unsigned* sel) {
    unsigned prefix = 0, prefix_mask = 0;
    float above = 0.f;  // count or mass of kept elements above the current prefix range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0.f;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const float v = x[i];
            const unsigned key = fkey(v);
            if (key >= floor_key && (key & prefix_mask) == prefix)
                atomicAdd(&hist[(key >> shift) & 255], MASS ? __expf((v - m) * inv_t) : 1.f);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float cum = above;
            int b = 255;
            for (; b > 0; --b) {
                if (cum + hist[b] >= target_or_k) break;
                cum += hist[b];
            }
            *sel = (unsigned)b;
            hist[256] = cum;
        }
        __syncthreads();
        above = hist[256];
        prefix |= (*sel) << shift;
        prefix_mask |= 255u << shift;
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(THREADS)
sample_rows(const float* __restrict__ logits, float* __restrict__ work, int V, const RowParams* __restrict__ params,
            const int* __restrict__ pen, int* __restrict__ out_tok, float* __restrict__ out_lp, int n_top,
            int* __restrict__ top_ids, float* __restrict__ top_lp, const unsigned* __restrict__ bits, int W) { pdl_enter();
    __shared__ float hist[257];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float scratch[32];
    __shared__ unsigned sel;
    __shared__ float bc_v;
    __shared__ int bc_i;
    __shared__ float chunk_prefix[THREADS];

    const int r = blockIdx.x;
    const RowParams P = params[r];
    const float* raw = logits + (size_t)r * V;
    float* x = work + (size_t)r * V;
    const unsigned* m = (bits != nullptr && P.mask_row >= 0) ? bits + (size_t)P.mask_row * W : nullptr;

    // 1. raw log-sum-exp and arg-max, copy to work. 16-byte loads, four per thread in flight: a
    // CTA alone streams the row, and one 4-byte load at a time per thread left it latency-bound
    // (~150 dependent round trips for a 152k vocabulary).
    float tm = -INFINITY, ts = 0.f, av = -INFINITY;
    int ai = 0x7fffffff;
    auto take = [&](float v, int i) {
        if (v > tm) { ts = ts * __expf(tm - v) + 1.f; tm = v; }
        else ts += __expf(v - tm);
        if (v > av) { av = v; ai = i; }  // indices rise per thread: the first of equal values stays
    };
    const int V4 = (V & 3) == 0 && m == nullptr ? V >> 2 : 0;  // rows start 16-byte aligned only when V % 4 == 0
    if (m != nullptr) {  // masked rows (a minority, never queued ahead) take the plain per-element loop
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const bool ok = allowed(m, i);
            x[i] = ok ? raw[i] : -INFINITY;
            if (ok) take(x[i], i);  // -inf would make take's running sum exp(-inf - -inf) = NaN
        }
    } else {
        const float4* raw4 = reinterpret_cast<const float4*>(raw);
        float4* x4 = reinterpret_cast<float4*>(x);
#pragma unroll 4
        for (int i = threadIdx.x; i < V4; i += blockDim.x) {
            const float4 v = raw4[i];
            x4[i] = v;
            take(v.x, 4 * i); take(v.y, 4 * i + 1); take(v.z, 4 * i + 2); take(v.w, 4 * i + 3);
        }
        for (int i = 4 * V4 + threadIdx.x; i < V; i += blockDim.x) {
            const float v = raw[i];
            x[i] = v;
            take(v, i);
        }
    }
    argmax_reduce(av, ai, &bc_v, &bc_i, sv, si);
    const float raw_max_v = bc_v;
    const int raw_max_i = bc_i;
    const float M0 = block_max(tm, scratch);
    const float Z0 = block_sum(tm == -INFINITY ? 0.f : ts * __expf(tm - M0), scratch);
    const float lse = M0 + __logf(Z0);
    __syncthreads();

    // 2. penalties (distinct ids: no two threads touch one element).
    for (int e = threadIdx.x; e < P.pen_n; e += blockDim.x) {
        const int id = pen[2 * (P.pen_off + e)], cnt = pen[2 * (P.pen_off + e) + 1];
        if (id < 0 || id >= V) continue;
        float v = x[id];
        if (P.rep != 1.f) v = v > 0.f ? v / P.rep : v * P.rep;
        v -= (cnt > 0 ? P.presence : 0.f) + P.frequency * (float)cnt;
        x[id] = v;
    }
    __syncthreads();

    int token;
    // Without penalties work == raw, whose arg-max pass 1 already found.
    if (P.pen_n > 0) block_argmax(x, V, INFINITY, -1, &bc_v, &bc_i, sv, si);
    const float xmax_v = P.pen_n > 0 ? bc_v : raw_max_v;
    const int xmax_i = P.pen_n > 0 ? bc_i : raw_max_i;
    if (!(P.temperature > 0.f)) {
        token = xmax_i;
    } else {
        const float inv_t = 1.f / P.temperature;
        const float M = xmax_v;  // largest (penalised) logit: softmax of (x - M) / T is overflow-free
        unsigned thr = 0;
        if (P.top_k > 0 && P.top_k < V) thr = radix_select<false>(x, V, 0u, (float)P.top_k, M, inv_t, hist, &sel);
        if (P.top_p < 1.f) {
            float zk = 0.f;
            for (int i = threadIdx.x; i < V; i += blockDim.x)
                if (fkey(x[i]) >= thr) zk += __expf((x[i] - M) * inv_t);
            zk = block_sum(zk, scratch);
            const unsigned tp = radix_select<true>(x, V, thr, P.top_p * zk, M, inv_t, hist, &sel);
            thr = max(thr, tp);
        }
        if (P.min_p > 0.f) thr = max(thr, fkey(M + P.temperature * __logf(P.min_p)));
        // 4. inverse CDF over the kept set, chunk per thread.
        const int chunk = (V + blockDim.x - 1) / blockDim.x;
        const int c0 = threadIdx.x * chunk, c1 = min(V, c0 + chunk);
        float s = 0.f;
        int last = -1;
        for (int i = c0; i < c1; ++i)
            if (fkey(x[i]) >= thr) {
                const float w = __expf((x[i] - M) * inv_t);
                s += w;
                if (w > 0.f) last = i;  // a masked (-inf) token is never the fallback pick
            }
        chunk_prefix[threadIdx.x] = s;
        __syncthreads();
        // Inclusive scan (Hillis-Steele; 10 steps for 1024 threads).
        for (int o = 1; o < (int)blockDim.x; o <<= 1) {
            const float add = threadIdx.x >= o ? chunk_prefix[threadIdx.x - o] : 0.f;
            __syncthreads();
            chunk_prefix[threadIdx.x] += add;
            __syncthreads();
        }
        const float total = chunk_prefix[blockDim.x - 1];
        const float u = philox_uniform(P.seed_lo, P.seed_hi, P.ctr_lo, P.ctr_hi) * total;
        const float before = threadIdx.x ? chunk_prefix[threadIdx.x - 1] : 0.f;
        if (threadIdx.x == 0) bc_i = -1;
        __syncthreads();
        if (s > 0.f && u >= before && u < before + s) {
            float acc = before;
            int pick = last;
            for (int i = c0; i < c1; ++i) {
                if (fkey(x[i]) < thr) continue;
                acc += __expf((x[i] - M) * inv_t);
                if (u < acc) { pick = i; break; }
            }
            bc_i = pick;
        }
        __syncthreads();
        if (bc_i < 0) {  // u rounded onto the total: take the last kept token
            if (last >= 0 && chunk_prefix[threadIdx.x] == total && s > 0.f) atomicMax(&bc_i, last);
            __syncthreads();
        }
        token = bc_i;
        if (token < 0) {  // nothing kept (cannot happen with finite logits): fall back to argmax
            token = bc_i = 0;
        }
    }
    if (threadIdx.x == 0) {
        out_tok[r] = token;
        out_lp[r] = (allowed(m, token) ? raw[token] : -INFINITY) - lse;
    }
    // 5. top-n of the raw distribution, most likely first.
    float lim_v = INFINITY;
    int lim_i = -1;
    for (int j = 0; j < n_top; ++j) {
        block_argmax(raw, V, lim_v, lim_i, &bc_v, &bc_i, sv, si, m);
        lim_v = bc_v;
        lim_i = bc_i;
        if (threadIdx.x == 0) {
            top_ids[r * n_top + j] = bc_i;
            top_lp[r * n_top + j] = bc_v - lse;
        }
    }
}
