// Paged attention over an f16 or Q8_0 KV cache: the KV stores and block copies, and attn_dN for
// prefill and mixed steps (decode-only steps: attention_decode.cu; on tensor cores: attention_mma.cu).
//
// Cache layout (per layer): K [num_slots, Hkv, Dk] and V [num_slots, Hkv, Dv] in f16, where
// slot = block * block_size + offset; a sequence's logical key n lives in block
// block_tables[b][n / block_size]. f16 halves the bytes a decode step reads per key compared
// with f32, and the values (post-projection K/V) are far inside its range.
//
// attn_dN: one CTA = (sequence b, kv head, tile of 32 query rows). A query row is a (token,
// q head) pair of that sequence whose q head maps to this kv head (GQA: head h uses kv head
// h / group); rows are token-major, so a tile covers 32/group tokens and every K/V tile loaded
// into shared memory serves all the q heads that share it. Keys stream through shared memory 32
// at a time with an online softmax (running max m and sum l per row), so no score matrix is
// ever materialised, whatever the prompt length.
//
// Within a warp (4 rows), lane j scores key j of the tile (K rows padded by one float in shared
// memory so the 32 lanes hit 32 different banks), then every lane accumulates output dims
// lane, lane+32, ... (N = 32 * DPL dims at most).
//
// Masks: causal (key n visible to a query at position p iff n <= p), sliding window (n > p -
// window when window > 0). Sinks: a per-q-head logit joining only the denominator. Softcap:
// s = softcap * tanh(s / softcap) before masking.
//
// The *_q8 kernels read a Q8_0 cache instead (--kv-cache-type q8_0, the CPU backend's format):
// levels int8 [num_slots, Hkv, D] and a half scale per 32 values [num_slots, Hkv, D / 32], each 32
// turned by the orthonormal Walsh-Hadamard transform H before rounding (it spreads a block's
// outlier channel over the 32). H is orthogonal and its own inverse, so a score q.k equals
// (Hq).(Hk): the kernels turn the query rows once, score against the stored blocks as they are,
// accumulate p * V in the turned space and turn each output row back at the end; a row's 32-blocks
// sit one per warp (a lane a value), where H is five xor-shuffle butterflies.
#include "attention_common.cuh"

#define KT 32        // keys per shared-memory tile
#define RPW 4        // query rows per warp
#define NWARPS 8
#define ROWS (RPW * NWARPS)

// Writes this step's K/V rows (float32 [T, Hkv, D]) into the f16 cache at slot_mapping[t].
extern "C" __global__ void kv_store_f16(const float* __restrict__ k, const float* __restrict__ v,
                                        const int* __restrict__ slots, __half* __restrict__ kc,
                                        __half* __restrict__ vc, int T, int Hkv, int Dk, int Dv) { pdl_enter();
    const int t = blockIdx.y;
    const int slot = slots[t];
    if (slot < 0) return;  // padding token: writes nothing
    const int nk = Hkv * Dk, nv = Hkv * Dv;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nk + nv; i += gridDim.x * blockDim.x) {
        if (i < nk) kc[(size_t)slot * nk + i] = __float2half_rn(k[(size_t)t * nk + i]);
        else vc[(size_t)slot * nv + (i - nk)] = __float2half_rn(v[(size_t)t * nv + (i - nk)]);
    }
}

// Writes this step's K/V rows (float32 [T, Hkv, D]) into a Q8_0 cache at slot_mapping[t]: a warp
// per 32 values (q8_store_turned). Grid (warps / 8, T), 256 threads.
extern "C" __global__ void kv_store_q8(const float* __restrict__ k, const float* __restrict__ v,
                                       const int* __restrict__ slots, int8_t* __restrict__ kq,
                                       int8_t* __restrict__ vq, __half* __restrict__ ks, __half* __restrict__ vs,
                                       int T, int Hkv, int Dk, int Dv) { pdl_enter();
    const int t = blockIdx.y;
    const int slot = slots[t];
    if (slot < 0) return;
    const int lane = threadIdx.x & 31;
    const int nbk = Hkv * Dk / 32, nbv = Hkv * Dv / 32;
    for (int blk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); blk < nbk + nbv;
         blk += gridDim.x * (blockDim.x >> 5)) {
        const bool is_k = blk < nbk;
        const int bi = is_k ? blk : blk - nbk, nb = is_k ? nbk : nbv;
        const float x = (is_k ? k : v)[((size_t)t * nb + bi) * 32 + lane];
        const size_t blk_at = (size_t)slot * nb + bi;
        q8_store_turned(x, lane, (is_k ? kq : vq) + blk_at * 32, (is_k ? ks : vs) + blk_at);
    }
}

// Copies whole KV blocks (every layer, K and V) from src to dst: the copy-on-write of a block
// that parallel samples of one prompt shared until they diverge. One launch per block pair: grid
// (chunks, layers, 2), K when blockIdx.z is 0, V when 1; 32-bit words (a block of f16 rows with an
// even head dim is always a whole number of them). k_layer / v_layer: words per layer;
// k_block / v_block: words per block.
extern "C" __global__ void kv_copy_block(unsigned* __restrict__ kc, unsigned* __restrict__ vc,
                                         long long k_layer, long long v_layer, int k_block, int v_block,
                                         int src, int dst) { pdl_enter();
    const int layer = blockIdx.y;
    const bool is_v = blockIdx.z != 0;
    unsigned* base = is_v ? vc + (size_t)layer * v_layer : kc + (size_t)layer * k_layer;
    const int words = is_v ? v_block : k_block;
    const unsigned* from = base + (size_t)src * words;
    unsigned* to = base + (size_t)dst * words;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) to[i] = from[i];
}

// The shared-memory staging of the query rows and of each K/V tile issues up to 8 of a thread's
// global loads before it uses any (and looks each key's cache slot up once per tile): one dependent
// round trip per element measured slower (qwen2.5 tg128 651 against 688 tok/s), and is gone.
template <int DPL, bool Q8>
__device__ void attn_impl(ATTN_IMPL_PARAMS) {
    extern __shared__ float smem[];
    float* Qs = smem;                       // [ROWS][Dk], pre-scaled
    float* Ks = Qs + ROWS * Dk;             // [KT][Dk + 1]
    float* Vs = Ks + KT * (Dk + 1);         // [KT][Dv]
    __shared__ int range_lo, range_hi;

    const int b = blockIdx.y, kvh = blockIdx.z;
    const int q0 = q_starts[b], nq = q_starts[b + 1] - q0;
    const int group = Hq / Hkv;
    // Split mode (decode): blockIdx.x picks a slice of the keys instead of a tile of rows.
    const int split = n_splits > 1 ? blockIdx.x : 0;
    const int row0 = n_splits > 1 ? 0 : blockIdx.x * ROWS;
    if (row0 >= nq * group) return;  // the grid is sized for the longest sequence of the step
    const int n_ctx = ctx_lens[b];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // The keys any of the tile's rows can see (in split mode: of this CTA's slice).
    if (tid == 0) {
        int lo = n_ctx, hi = 0;
        const int t_first = row0 / group, t_last = min(nq * group - 1, row0 + ROWS - 1) / group;
        for (int t = t_first; t <= t_last; ++t) {
            const int p = positions[q0 + t];
            hi = max(hi, min(p + 1, n_ctx));
            lo = min(lo, window > 0 ? max(0, p - window + 1) : 0);
        }
        if (n_splits > 1) {  // this CTA's slice, whole key tiles
            const int chunk = ((max(hi - lo, 0) + n_splits - 1) / n_splits + KT - 1) / KT * KT;
            lo = lo + split * chunk;
            hi = min(hi, lo + chunk);
        }
        range_lo = lo;
        range_hi = hi;
    }
    __syncthreads();
    if (n_splits > 1 && range_lo >= range_hi) {
        // A slice past the context (the split count is fixed by the batch shape, not the context:
        // a short one leaves most slices empty): an empty partial, without staging anything.
        for (int e = tid; e < nq * group * (Dv + 2); e += blockDim.x) {
            const int gr = e / (Dv + 2), d = e - gr * (Dv + 2);
            float* o = part + (((size_t)(q0 + gr / group) * Hq + kvh * group + gr % group) * n_splits + split) * (Dv + 2);
            o[d] = d == Dv ? -INFINITY : 0.f;
        }
        return;
    }

    // Stage the tile's query rows (scaled).
    for (int e0 = tid; e0 < ROWS * Dk; e0 += 8 * blockDim.x) {
        float val[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int e = e0 + i * blockDim.x, r = e / Dk, d = e - r * Dk, gr = row0 + r;
            val[i] = 0.f;
            if (e < ROWS * Dk && gr < nq * group)
                val[i] = q[((size_t)(q0 + gr / group) * Hq + kvh * group + gr % group) * Dk + d];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (e0 + i * blockDim.x < ROWS * Dk) Qs[e0 + i * blockDim.x] = val[i] * scale;
    }
    if constexpr (Q8) {  // the query rows turned by H, 32 values a warp
        __syncthreads();
        for (int blk = warp; blk < ROWS * Dk / 32; blk += NWARPS)
            Qs[blk * 32 + lane] = wht32_warp(Qs[blk * 32 + lane], lane);
    }
    __syncthreads();
    const int lo = range_lo, hi = range_hi;

    // This warp's rows: position (INT_MIN marks a row past the end) and q head.
    int pos[RPW];
    float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int gr = row0 + warp * RPW + i;
        pos[i] = gr < nq * group ? positions[q0 + gr / group] : INT_MIN;
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[i][c] = 0.f;
    }
    const int* btab = block_tables + (size_t)b * max_blocks;
    const int hk2 = Dk >> 1, hv2 = Dv >> 1;

    __shared__ int slot_s[KT];  // the tile's cache slots (-1: past `hi`)
    for (int k0 = lo; k0 < hi; k0 += KT) {
        // K/V tile -> shared (f16 -> f32). Keys past `hi` become zeros: their p is 0, and a
        // zero (not garbage) V keeps 0 * V finite.
        if (tid < KT) {
            const int n = k0 + tid;
            slot_s[tid] = n < hi ? btab[n / block_size] * block_size + n % block_size : -1;
        }
        __syncthreads();
        for (int e0 = tid; e0 < KT * (hk2 + hv2); e0 += 8 * blockDim.x) {
            float2 f[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = e0 + i * blockDim.x;
                const bool is_k = e < KT * hk2;
                const int e2 = is_k ? e : e - KT * hk2, per = is_k ? hk2 : hv2;
                const int j = e2 / per, c = e2 - j * per;
                f[i] = make_float2(0.f, 0.f);
                if (e < KT * (hk2 + hv2) && slot_s[j] >= 0) {
                    const size_t row = (size_t)slot_s[j] * Hkv + kvh;
                    const int D = is_k ? Dk : Dv;
                    if constexpr (Q8) {
                        const float2 lv = sbytes2(reinterpret_cast<const unsigned short*>(
                            static_cast<const int8_t*>(is_k ? kc : vc) + row * D)[c]);
                        const float dsc = __half2float((is_k ? ks : vs)[row * (D >> 5) + (c >> 4)]);
                        f[i] = make_float2(dsc * lv.x, dsc * lv.y);
                    } else {
                        f[i] = __half22float2(reinterpret_cast<const __half2*>(
                            static_cast<const __half*>(is_k ? kc : vc) + row * D)[c]);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = e0 + i * blockDim.x;
                if (e >= KT * (hk2 + hv2)) continue;
                const bool is_k = e < KT * hk2;
                const int e2 = is_k ? e : e - KT * hk2, per = is_k ? hk2 : hv2;
                const int j = e2 / per, c = e2 - j * per;
                if (is_k) { Ks[j * (Dk + 1) + 2 * c] = f[i].x; Ks[j * (Dk + 1) + 2 * c + 1] = f[i].y; }
                else { Vs[j * Dv + 2 * c] = f[i].x; Vs[j * Dv + 2 * c + 1] = f[i].y; }
            }
        }
        __syncthreads();

        // Scores of key k0 + lane for the warp's rows.
        float s[RPW];
#pragma unroll
        for (int i = 0; i < RPW; ++i) s[i] = 0.f;
        const float* kr = Ks + lane * (Dk + 1);
        const float* qr = Qs + (warp * RPW) * Dk;
        for (int d = 0; d < Dk; ++d) {
            const float kd = kr[d];
#pragma unroll
            for (int i = 0; i < RPW; ++i) s[i] = fmaf(qr[i * Dk + d], kd, s[i]);
        }
        const int n = k0 + lane;
        float p[RPW];
#pragma unroll
        for (int i = 0; i < RPW; ++i) {
            float si = s[i];
            if (softcap > 0.f) si = softcap * tanhf(si / softcap);
            const bool vis = n < hi && n <= pos[i] && (window <= 0 || n > pos[i] - window);
            si = vis ? si : -INFINITY;
            const float m_new = fmaxf(m[i], warp_max(si));
            if (m_new == -INFINITY) { p[i] = 0.f; continue; }  // nothing visible yet for this row
            const float corr = __expf(m[i] - m_new);
            p[i] = vis ? __expf(si - m_new) : 0.f;
            l[i] = l[i] * corr + warp_sum(p[i]);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[i][c] *= corr;
        }
        // acc[i][c] += sum_j p_j * V[j][lane + 32c]
        for (int j = 0; j < KT; ++j) {
            float vj[DPL];
#pragma unroll
            for (int c = 0; c < DPL; ++c) {
                const int d = lane + 32 * c;
                vj[c] = d < Dv ? Vs[j * Dv + d] : 0.f;
            }
#pragma unroll
            for (int i = 0; i < RPW; ++i) {
                const float pj = __shfl_sync(FULL_MASK, p[i], j);
#pragma unroll
                for (int c = 0; c < DPL; ++c) acc[i][c] = fmaf(pj, vj[c], acc[i][c]);
            }
        }
        __syncthreads();  // before the next tile overwrites Ks/Vs
    }

    if constexpr (Q8) {  // back from the turned space: lane j holds value j of each 32-block c
#pragma unroll
        for (int i = 0; i < RPW; ++i)
#pragma unroll
            for (int c = 0; c < DPL; ++c) acc[i][c] = wht32_warp(acc[i][c], lane);
    }
    if (n_splits > 1) {  // unnormalised partials [t * Hq + h][split][Dv + 2]: acc..., m, l
#pragma unroll
        for (int i = 0; i < RPW; ++i) {
            const int gr = row0 + warp * RPW + i;
            if (gr >= nq * group) continue;
            const int t = q0 + gr / group, h = kvh * group + gr % group;
            float* o = part + (((size_t)t * Hq + h) * n_splits + split) * (Dv + 2);
#pragma unroll
            for (int c = 0; c < DPL; ++c) {
                const int d = lane + 32 * c;
                if (d < Dv) o[d] = acc[i][c];
            }
            if (lane == 0) { o[Dv] = m[i]; o[Dv + 1] = l[i]; }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int gr = row0 + warp * RPW + i;
        if (gr >= nq * group) continue;
        const int t = q0 + gr / group, h = kvh * group + gr % group;
        float mi = m[i], li = l[i], f = 1.f;
        if (sinks) {
            const float sk = sinks[h];
            const float mf = fmaxf(mi, sk);
            f = __expf(mi - mf);  // mi = -inf (nothing visible) gives 0: output 0
            li = li * f + __expf(sk - mf);
        }
        const float inv = li > 0.f ? f / li : 0.f;
        float* o = out + ((size_t)t * Hq + h) * Dv;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < Dv) o[d] = acc[i][c] * inv;
        }
    }
}

// attn_d<DPL>_b: the name the batched-load kernels had beside the per-element ones, kept
// attn_d<DPL>_q8: the same over a Q8_0 cache (levels kc/vc, scales ks/vs).
#define ATTN(DPL)                                                                                        \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                            \
    attn_d##DPL##_b(const float* q, const __half* kc, const __half* vc, float* out, const int* q_starts, \
                const int* positions, const int* ctx_lens, const int* block_tables, int max_blocks,      \
                int block_size, int Hq, int Hkv, int Dk, int Dv, float scale, int window,                \
                const float* sinks, float softcap, int n_splits, float* part) { pdl_enter();             \
        attn_impl<DPL, false>(q, kc, vc, nullptr, nullptr, out, q_starts, positions, ctx_lens,           \
                              block_tables, max_blocks, block_size, Hq, Hkv, Dk, Dv, scale, window, sinks, \
                              softcap, n_splits, part);                                                  \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                            \
    attn_d##DPL##_q8(const float* q, const int8_t* kc, const int8_t* vc, const __half* ks,               \
                     const __half* vs, float* out, const int* q_starts, const int* positions,            \
                     const int* ctx_lens, const int* block_tables, int max_blocks, int block_size,       \
                     int Hq, int Hkv, int Dk, int Dv, float scale, int window, const float* sinks,       \
                     float softcap, int n_splits, float* part) { pdl_enter();                            \
        attn_impl<DPL, true>(q, kc, vc, ks, vs, out, q_starts, positions, ctx_lens, block_tables,        \
                             max_blocks, block_size, Hq, Hkv, Dk, Dv, scale, window, sinks, softcap,     \
                             n_splits, part);                                                            \
    }

ATTN(1)
ATTN(2)
ATTN(3)
ATTN(4)
ATTN(5)
ATTN(6)
ATTN(8)

// Merges the n_splits partial softmaxes of each (token, q head) row written by attn_dN in split
// mode; one warp per row. Sinks join the denominator here, once.
extern "C" __global__ void attn_combine(const float* __restrict__ part, float* __restrict__ out,
                                        const float* __restrict__ sinks, int rows, int Hq, int Dv,
                                        int n_splits, int8_t* oq, float* od) { pdl_enter();
    __shared__ float wsh[8][MAX_SPLITS];  // a warp's each: launched with 256 threads
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    merge_split_row<8>(part + (size_t)row * n_splits * (Dv + 2), out + (size_t)row * Dv,
                       sinks ? sinks + row % Hq : nullptr, Dv, n_splits, threadIdx.x & 31, wsh[threadIdx.x >> 5]);
    if (oq) q8_store_row(out + (size_t)row * Dv, oq + (size_t)row * Dv, od + (size_t)row * Dv / 32, Dv, threadIdx.x & 31);
}
