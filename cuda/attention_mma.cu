// Attention on tensor cores over the paged f16 KV cache (attention.cu's layout and masks): prefill
// (attn_mma_d*) and GQA decode (attn_decm_d*, at the end). attn_dN scores and accumulates with scalar float32 FMAs: a long prompt's attention is
// quadratic in its length, and on CUDA cores a 32k-token prefill spent most of its time there.
//
// attn_mma_d<D>: one CTA = (sequence b, kv head, tile of 64 query rows), rows token-major (token,
// q head of this kv head) as in attn_dN, so every K/V tile serves all the q heads sharing it. Four
// warps, 16 rows each. Keys stream through shared memory 64 at a time, K and V rows in f16 as the
// cache holds them. Per tile a warp computes S = Q K^T (mma.sync m16n8k16: f16 in, f32
// accumulate; Q pre-scaled in f16), masks it, updates its rows' online softmax in f32, and adds
// P V with P rounded to f16 (the accumulator layout of S is the A-operand layout of P, so P never
// leaves registers). Fragments come from shared memory by ldmatrix (V's transposed).
//
// Register layouts (PTX ISA, m16n8k16, lane = 4 g + t): A a0a1 (row g, k 2t..2t+1), a2a3 (row
// g+8, k 2t..), a4a5 (row g, k 2t+8..), a6a7 (row g+8, k 2t+8..); B b0b1 (k 2t..2t+1, n g), b2b3
// (k 2t+8.., n g); C c0c1 (row g, n 2t..2t+1), c2c3 (row g+8, n 2t..). A thread's rows are g and
// g + 8 of its warp's 16, each row's keys spread over the 4 threads of a quad.
#include "attention_common.cuh"

#define MR 64  // query rows per CTA (4 warps x 16)
#define MK 64  // keys per tile

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const __half* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const __half* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

// Max / sum over the 4 threads of a quad (the threads holding one row's keys).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    return v + __shfl_xor_sync(FULL_MASK, v, 2);
}

// A warp's share of one key tile, shared by attn_mma and attn_decm. Ks / Vs: the tile's NT * 8 K
// and V rows in shared memory, LD halves apart; qa: the warp's 16 query rows as A fragments.

// S = Q K^T: n-tiles 2jn and 2jn + 1 (keys 16 jn ..) from one ldmatrix.x4 per k-step.
template <int KS, int NT, int LD>
__device__ __forceinline__ void qk_tile(float (&s)[NT][4], const unsigned (&qa)[KS][4], const __half* Ks, int lane) {
    const int mi = lane >> 3;  // which of ldmatrix's four 8x8 matrices this lane addresses a row of
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int jn = 0; jn < NT / 2; ++jn) {
            unsigned r[4];
            ldsm_x4(r, Ks + (jn * 16 + (mi >> 1) * 8 + (lane & 7)) * LD + kk * 16 + (mi & 1) * 8);
            mma16816(s[2 * jn], qa[kk], r[0], r[1]);
            mma16816(s[2 * jn + 1], qa[kk], r[2], r[3]);
        }
    }
}

// The online softmax of the thread's rows g and g + 8 over the tile's masked scores s (-inf where
// masked; mx: each row's max over this thread's), which become the weights p; m and l move on and
// the accumulators o are rescaled.
template <int NT, int NO>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], const float (&mx)[2], float (&m)[2], float (&l)[2],
                                             float (&o)[NO][4]) {
    float corr[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        const float m_new = fmaxf(m[ri], quad_max(mx[ri]));
        corr[ri] = m_new == -INFINITY ? 1.f : __expf(m[ri] - m_new);  // nothing visible yet: stays 0
        m[ri] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int ri = c >> 1;
            const float p = s[j][c] == -INFINITY ? 0.f : __expf(s[j][c] - m[ri]);
            s[j][c] = p;
            rs[ri] += p;
        }
    }
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) l[ri] = l[ri] * corr[ri] + quad_sum(rs[ri]);
#pragma unroll
    for (int j = 0; j < NO; ++j) {
        o[j][0] *= corr[0]; o[j][1] *= corr[0];
        o[j][2] *= corr[1]; o[j][3] *= corr[1];
    }
}

// O += P V, 16 keys a k-step: P's A fragment from S's n-tiles 2kk and 2kk + 1 (P rounded to f16).
template <int KS, int NT, int LD>
__device__ __forceinline__ void pv_tile(float (&o)[2 * KS][4], const float (&p)[NT][4], const __half* Vs, int lane) {
    const int mi = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        const unsigned pa[4] = {pack_half2(p[2 * kk][0], p[2 * kk][1]), pack_half2(p[2 * kk][2], p[2 * kk][3]),
                                pack_half2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                                pack_half2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dn = 0; dn < KS; ++dn) {
            unsigned r[4];
            ldsm_x4_t(r, Vs + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * LD + dn * 16 + (mi >> 1) * 8);
            mma16816(o[2 * dn], pa, r[0], r[1]);
            mma16816(o[2 * dn + 1], pa, r[2], r[3]);
        }
    }
}

template <int D>
__device__ void attn_mma_impl(const float* __restrict__ q, const __half* __restrict__ kc,
                              const __half* __restrict__ vc, float* __restrict__ out,
                              const int* __restrict__ q_starts, const int* __restrict__ positions,
                              const int* __restrict__ ctx_lens, const int* __restrict__ block_tables, int max_blocks,
                              int block_size, int Hq, int Hkv, float scale, int window,
                              const float* __restrict__ sinks, float softcap) {
    constexpr int LD = D + 8;  // row stride in halves: 16-byte aligned rows, ldmatrix without bank conflicts
    constexpr int NT = MK / 8;  // n-tiles of S per warp
    constexpr int KS = D / 16;  // k-steps of Q K^T; also pairs of 8-wide output tiles
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half* Qs = reinterpret_cast<__half*>(smem_raw);  // [MR][LD], pre-scaled
    __half* Ks = Qs + MR * LD;                         // [MK][LD]
    __half* Vs = Ks + MK * LD;                         // [MK][LD]
    __shared__ int slot_s[MK];
    __shared__ int range_lo, range_hi;

    const int b = blockIdx.y, kvh = blockIdx.z, row0 = blockIdx.x * MR;
    const int q0 = q_starts[b], nq = q_starts[b + 1] - q0;
    const int group = Hq / Hkv, nrows = nq * group;
    if (row0 >= nrows) return;  // the grid is sized for the longest sequence of the step
    const int n_ctx = ctx_lens[b];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;

    if (tid == 0) {
        int lo = n_ctx, hi = 0;
        const int t_first = row0 / group, t_last = min(nrows - 1, row0 + MR - 1) / group;
        for (int t = t_first; t <= t_last; ++t) {
            const int p = positions[q0 + t];
            hi = max(hi, min(p + 1, n_ctx));
            lo = min(lo, window > 0 ? max(0, p - window + 1) : 0);
        }
        range_lo = lo;
        range_hi = hi;
    }
    // Q rows -> f16 (scaled), zeros past the sequence's rows
    for (int e = tid; e < MR * (D / 2); e += blockDim.x) {
        const int r = e / (D / 2), c2 = e - r * (D / 2), gr = row0 + r;
        float2 v = make_float2(0.f, 0.f);
        if (gr < nrows)
            v = reinterpret_cast<const float2*>(q + ((size_t)(q0 + gr / group) * Hq + kvh * group + gr % group) * D)[c2];
        reinterpret_cast<__half2*>(Qs + r * LD)[c2] = __floats2half2_rn(v.x * scale, v.y * scale);
    }
    __syncthreads();
    const int lo = range_lo, hi = range_hi;

    // This thread's two rows (g and g + 8 of the warp's 16): position, INT_MIN past the end
    int pos[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        const int gr = row0 + warp * 16 + g + 8 * ri;
        pos[ri] = gr < nrows ? positions[q0 + gr / group] : INT_MIN;
    }
    unsigned qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) ldsm_x4(qa[kk], Qs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);

    float o[2 * KS][4];
#pragma unroll
    for (int j = 0; j < 2 * KS; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int* btab = block_tables + (size_t)b * max_blocks;

    for (int k0 = lo; k0 < hi; k0 += MK) {
        __syncthreads();  // the previous tile's readers are done
        if (tid < MK) {
            const int n = k0 + tid;
            slot_s[tid] = n < hi ? btab[n / block_size] * block_size + n % block_size : -1;
        }
        __syncthreads();
        // K and V rows -> shared, 16 bytes a load, 8 loads in flight per thread; rows past `hi`
        // are zeros (masked scores; 0 * V stays finite).
        constexpr int CH = D / 8;  // 16-byte chunks per row
        for (int e0 = tid; e0 < 2 * MK * CH; e0 += 8 * blockDim.x) {
            uint4 v[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = e0 + i * blockDim.x;
                v[i] = make_uint4(0, 0, 0, 0);
                if (e < 2 * MK * CH) {
                    const int is_v = e >= MK * CH, e2 = e - is_v * MK * CH, j = e2 / CH, c = e2 - j * CH;
                    if (slot_s[j] >= 0)
                        v[i] = __ldg(reinterpret_cast<const uint4*>((is_v ? vc : kc) + ((size_t)slot_s[j] * Hkv + kvh) * D) + c);
                }
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int e = e0 + i * blockDim.x;
                if (e < 2 * MK * CH) {
                    const int is_v = e >= MK * CH, e2 = e - is_v * MK * CH, j = e2 / CH, c = e2 - j * CH;
                    *reinterpret_cast<uint4*>((is_v ? Vs : Ks) + j * LD + c * 8) = v[i];
                }
            }
        }
        __syncthreads();

        float s[NT][4];
        qk_tile<KS, NT, LD>(s, qa, Ks, lane);
        // softcap and masks, then the online softmax of the thread's two rows
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int ri = c >> 1, n = k0 + 8 * j + 2 * t4 + (c & 1);
                float si = s[j][c];
                if (softcap > 0.f) si = softcap * tanhf(si / softcap);
                const bool vis = n < hi && n <= pos[ri] && (window <= 0 || n > pos[ri] - window);
                s[j][c] = vis ? si : -INFINITY;
                mx[ri] = fmaxf(mx[ri], s[j][c]);
            }
        }
        softmax_tile(s, mx, m, l, o);
        pv_tile<KS, NT, LD>(o, s, Vs, lane);
    }

    // Normalise (a sink logit joins the denominator) and write the thread's two rows.
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        const int gr = row0 + warp * 16 + g + 8 * ri;
        if (gr >= nrows) continue;
        const int t = q0 + gr / group, h = kvh * group + gr % group;
        float li = l[ri], f = 1.f;
        if (sinks) {
            const float sk = sinks[h];
            const float mf = fmaxf(m[ri], sk);
            f = __expf(m[ri] - mf);  // m = -inf (nothing visible) gives 0: output 0
            li = li * f + __expf(sk - mf);
        }
        const float inv = li > 0.f ? f / li : 0.f;
        float* orow = out + ((size_t)t * Hq + h) * D;
#pragma unroll
        for (int j = 0; j < 2 * KS; ++j)
            *reinterpret_cast<float2*>(orow + 8 * j + 2 * t4) = make_float2(o[j][2 * ri] * inv, o[j][2 * ri + 1] * inv);
    }
}

#define ATTN_MMA(D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                    \
    attn_mma_d##D(const float* q, const __half* kc, const __half* vc, float* out, const int* q_starts,   \
                  const int* positions, const int* ctx_lens, const int* block_tables, int max_blocks,    \
                  int block_size, int Hq, int Hkv, float scale, int window, const float* sinks,          \
                  float softcap) { pdl_enter();                                                          \
        attn_mma_impl<D>(q, kc, vc, out, q_starts, positions, ctx_lens, block_tables, max_blocks,        \
                         block_size, Hq, Hkv, scale, window, sinks, softcap);                             \
    }

ATTN_MMA(64)
ATTN_MMA(96)
ATTN_MMA(128)

// attn_decm_d<D>: decode steps (one query token per sequence) on tensor cores. attn_dec scores a
// key per lane with scalar FMAs over every dim of each of the group's q heads: thousands of
// dependent instructions per 32-key tile on a handful of warps, a latency chain (ncu: DRAM under
// 1 % busy at qwen2.5's B=1). Here the group's G <= 16 q heads are the rows of one m16n8k16 A tile
// (rows past G are zeros), so a warp's 32-key tile is D / 4 mma for S = Q K^T and D / 4 for P V.
// One CTA = (key slice, sequence, kv head), with attn_dec's arguments, slices and in-kernel merge.
// Each of its 4 warps stages its own 32 K and V rows by cp.async (K and V as separate groups:
// scoring starts once K has landed while V still comes), keeps its own online softmax, and the
// warps merge through shared memory at the end.
#define DW 4    // warps per CTA
#define DKT 32  // keys per warp tile

template <int D>
__device__ void attn_decm_impl(const float* __restrict__ q, const __half* __restrict__ kc,
                               const __half* __restrict__ vc, float* __restrict__ out,
                               const int* __restrict__ q_starts, const int* __restrict__ positions,
                               const int* __restrict__ ctx_lens, const int* __restrict__ block_tables, int max_blocks,
                               int block_size, int Hq, int Hkv, float scale, int window,
                               const float* __restrict__ sinks, float softcap, int n_splits, float* __restrict__ part,
                               int* __restrict__ counters, int8_t* oq, float* od) {
    constexpr int LD = D + 8;   // row stride in halves (attn_mma's)
    constexpr int KS = D / 16;  // k-steps of Q K^T; also pairs of 8-wide output tiles
    constexpr int CPR = D / 8;  // 16-byte chunks per K or V row
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half* Qs = reinterpret_cast<__half*>(smem_raw);  // [16][LD], pre-scaled
    __half* Tiles = Qs + 16 * LD;                      // per warp: K [DKT][LD] then V [DKT][LD]
    float* As = reinterpret_cast<float*>(Tiles);       // after the key loop: [DW][16][D] partial outputs
    __shared__ float Ms[DW][16], Ls[DW][16];

    const int b = blockIdx.y, kvh = blockIdx.z, split = blockIdx.x;
    const int t = q_starts[b];
    if (q_starts[b + 1] - t != 1) return;  // no token of this sequence in the step
    const int G = Hq / Hkv, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int p = positions[t];
    int hi = min(p + 1, ctx_lens[b]), lo = window > 0 ? max(0, p - window + 1) : 0;
    if (n_splits > 1) {  // slices of whole 4-warp passes, as attn_dec's
        constexpr int PASS = DW * DKT;
        const int chunk = ((max(hi - lo, 0) + n_splits - 1) / n_splits + PASS - 1) / PASS * PASS;
        lo += split * chunk;
        hi = min(hi, lo + chunk);
    }
    const float* qh = q + ((size_t)t * Hq + kvh * G) * D;  // the group's G rows are contiguous
    for (int e = tid; e < 16 * (D / 2); e += blockDim.x) {
        const int r = e / (D / 2), c2 = e - r * (D / 2);
        float2 v = make_float2(0.f, 0.f);
        if (r < G && lo < hi) v = reinterpret_cast<const float2*>(qh + (size_t)r * D)[c2];
        reinterpret_cast<__half2*>(Qs + r * LD)[c2] = __floats2half2_rn(v.x * scale, v.y * scale);
    }
    __syncthreads();
    unsigned qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) ldsm_x4(qa[kk], Qs + (lane & 15) * LD + kk * 16 + (lane >> 4) * 8);

    float o[2 * KS][4];
#pragma unroll
    for (int j = 0; j < 2 * KS; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int* btab = block_tables + (size_t)b * max_blocks;
    __half* Ks = Tiles + warp * 2 * DKT * LD;
    __half* Vs = Ks + DKT * LD;

    for (int k0 = lo + warp * DKT; k0 < hi; k0 += DW * DKT) {
        // Key k0 + lane's cache slot. Keys past `hi` borrow key k0's (always written), so the V rows
        // they add with p = 0 are finite: a never-written row may hold NaN bits, and 0 * NaN = NaN.
        const int n = k0 + lane;
        int sl = n < hi ? btab[n / block_size] * block_size + n % block_size : 0;
        const int sl0 = __shfl_sync(FULL_MASK, sl, 0);
        sl = n < hi ? sl : sl0;
        int src[CPR];  // the slot of the row each of this lane's chunks belongs to
#pragma unroll
        for (int i = 0; i < CPR; ++i) src[i] = __shfl_sync(FULL_MASK, sl, (lane + 32 * i) / CPR);
        __syncwarp();  // the previous tile's fragments are read: its rows may be overwritten
#pragma unroll
        for (int i = 0; i < CPR; ++i) {
            const int e = lane + 32 * i, r = e / CPR, c = e - r * CPR;
            cp_async16(Ks + r * LD + 8 * c, kc + ((size_t)src[i] * Hkv + kvh) * D + 8 * c);
        }
        cp_async_commit();
#pragma unroll
        for (int i = 0; i < CPR; ++i) {
            const int e = lane + 32 * i, r = e / CPR, c = e - r * CPR;
            cp_async16(Vs + r * LD + 8 * c, vc + ((size_t)src[i] * Hkv + kvh) * D + 8 * c);
        }
        cp_async_commit();
        cp_async_wait1();  // K has landed
        __syncwarp();

        float s[DKT / 8][4];
        qk_tile<KS, DKT / 8, LD>(s, qa, Ks, lane);
        // softcap and keys past `hi`, then the online softmax of the thread's rows g and g + 8
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < DKT / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float si = s[j][c];
                if (softcap > 0.f) si = softcap * tanhf(si / softcap);
                s[j][c] = k0 + 8 * j + 2 * t4 + (c & 1) < hi ? si : -INFINITY;
                mx[c >> 1] = fmaxf(mx[c >> 1], s[j][c]);
            }
        }
        softmax_tile(s, mx, m, l, o);
        cp_async_wait0();  // V has landed
        __syncwarp();
        pv_tile<KS, DKT / 8, LD>(o, s, Vs, lane);
    }
    __syncthreads();  // As overlays the other warps' tiles

    // The warps' softmax states and outputs -> shared, merged per (row, dim); then a partial for
    // the merge, or the normalised output.
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        const int r = g + 8 * ri;
        if (r >= G) continue;
        if (t4 == 0) { Ms[warp][r] = m[ri]; Ls[warp][r] = l[ri]; }
#pragma unroll
        for (int j = 0; j < 2 * KS; ++j)
            *reinterpret_cast<float2*>(As + (warp * 16 + r) * D + 8 * j + 2 * t4) = make_float2(o[j][2 * ri], o[j][2 * ri + 1]);
    }
    __syncthreads();
    for (int e = tid; e < G * D; e += blockDim.x) {
        const int r = e / D, d = e - r * D, h = kvh * G + r;
        float M, L, A;
        merge_warp_states<DW>(&Ms[0][r], &Ls[0][r], 16, As + r * D + d, 16 * D, M, L, A);
        store_slice_row(part, out, t, Hq, h, split, n_splits, D, d, n_splits == 1 ? normalised_row(M, L, A, sinks, h) : A,
                        M, L);
    }
    if (n_splits > 1 && counters)
        attn_dec_merge<(D + 31) / 32>(part, out, sinks, counters + b * Hkv + kvh, t, kvh, G, Hq, D, n_splits, oq, od);
}

// attn_decm_d<D>: attn_dec's f16 arguments (Dk = Dv = D; 544 * (D + 8) bytes of dynamic shared memory).
#define ATTN_DECM(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(DW * 32)                                                \
    attn_decm_d##D(const float* q, const __half* kc, const __half* vc, float* out, const int* q_starts,  \
                   const int* positions, const int* ctx_lens, const int* block_tables, int max_blocks,   \
                   int block_size, int Hq, int Hkv, int Dk, int Dv, float scale, int window,             \
                   const float* sinks, float softcap, int n_splits, float* part, int* counters,          \
                   int8_t* oq, float* od) {                                                              \
        pdl_enter();                                                                                     \
        attn_decm_impl<D>(q, kc, vc, out, q_starts, positions, ctx_lens, block_tables, max_blocks,       \
                          block_size, Hq, Hkv, scale, window, sinks, softcap, n_splits, part, counters,  \
                          oq, od);                                                                       \
    }

ATTN_DECM(64)
ATTN_DECM(96)
ATTN_DECM(128)
