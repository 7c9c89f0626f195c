// Decode-only attention steps (every sequence adds one query token) over the paged f16 or Q8_0
// KV cache: attention.cu describes the layout, the masks and the Q8_0 turn.
#include "attention_common.cuh"

// attn_dec_g<GM>_n<NC>: decode steps only (every sequence has one query token). attn_dN gives a
// CTA 32 query rows, and a decode token of an MHA model fills one of them: 31/32 of its scoring
// and half its staging work were waste, and its shared-memory staging (two barriers per 32 keys)
// kept a CTA's loads from overlapping. Here one CTA = (key slice, sequence, kv head) with the
// GM >= group query heads of that kv head; each of its 4 warps walks its own 32-key tiles straight
// from global memory (lane j scores key j of the tile: 16-byte K loads, q broadcast from shared
// memory; then the warp accumulates p * V, a lane owning 2 dims per 64, or over a Q8_0 cache with
// one or two query heads 8 dims of a row), keeping its own online softmax; the warps merge
// through shared memory at the end. NC = ceil(Dv / 64).
// The last of a (sequence, kv head)'s n_splits CTAs merges all their partials (attn_dec_merge in
// attention_common.cuh), as attn_combine would one launch later.
// ST (NC <= 2; the host routes Dk > 64 NC elsewhere): a warp copies its 32-key K tile into shared
// memory first, in 16-byte cp.async copies of whole rows (a row's bytes are contiguous, so a warp's
// copy touches each cache line once), and lane j then scores key j from there. Read straight from global
// memory, each of a lane's 16-byte loads lands on its own row: 32 lines per load instruction.
// The next tile's copy is issued as soon as the scores are read, so it lands while the warp
// works through this tile's softmax and V rows. Rows are padded by 16 bytes: lanes 8 apart then
// hit different banks.
template <bool ST>
__device__ __forceinline__ uint4 ld_k16(const uint4* p) {
    if constexpr (ST) return *p;  // shared memory
    else return __ldg(p);
}

// ORCD_ATTN_Q8_DP4A (tuning.py): over a Q8_0 cache the turned q is rounded to int8 blocks too (its
// own float scale a block, GGML's rounding), and a key's score is a dp4a sum a block: 8 dp4a of
// the levels as stored in place of 32 conversions and 32 FMAs a block and q head.
#ifndef ORCD_ATTN_Q8_DP4A
#define ORCD_ATTN_Q8_DP4A 0
#endif

template <int GM, int NC, bool Q8, bool ST>
__device__ void attn_dec_impl(ATTN_IMPL_PARAMS, int* __restrict__ counters, int8_t* oq, float* od) {
    constexpr int NW = 4;
    constexpr int QD = ST ? 64 * NC : 256;                    // q row floats held
    constexpr int KROW = ST ? (Q8 ? 64 : 128) * NC + 16 : 0;  // a staged key row's bytes
    constexpr int STAGE_BYTES = NW * 32 * KROW, AS_BYTES = NW * GM * NC * 64 * 4;
    __shared__ __align__(16) float Qs[GM][QD];
    __shared__ float Ms[NW][GM], Ls[NW][GM];
    constexpr bool QI = Q8 && ORCD_ATTN_Q8_DP4A;
    // QI: q's int8 levels, 4 a word, and a scale a 32-block
    __shared__ __align__(16) int Qi[QI ? GM : 1][QI ? QD / 4 : 4];
    __shared__ float Qd[QI ? GM : 1][QI ? QD / 32 : 1];
    // the warps' K tiles during the key loop, then (after a barrier) their partial outputs
    __shared__ __align__(16) unsigned char Sh[STAGE_BYTES > AS_BYTES ? STAGE_BYTES : AS_BYTES];
    float(*As)[GM][NC * 64] = reinterpret_cast<float(*)[GM][NC * 64]>(Sh);
    const int b = blockIdx.y, kvh = blockIdx.z, split = blockIdx.x;
    const int t = q_starts[b];
    if (q_starts[b + 1] - t != 1) return;  // no token of this sequence in the step
    const int G = Hq / Hkv, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p = positions[t];
    int hi = min(p + 1, ctx_lens[b]), lo = window > 0 ? max(0, p - window + 1) : 0;
    if (n_splits > 1) {
        // Slices of whole 4-warp passes (128 keys): with 32-key slices a short context kept 3 of
        // each CTA's 4 warps idle and spread over up to 4x the slices the merge must read.
        constexpr int PASS = NW * 32;
        const int chunk = ((max(hi - lo, 0) + n_splits - 1) / n_splits + PASS - 1) / PASS * PASS;
        lo += split * chunk;
        hi = min(hi, lo + chunk);
    }
    if (lo < hi) {  // the G query rows of this kv head are contiguous: G * Dk floats
        const float* qh = q + ((size_t)t * Hq + kvh * G) * Dk;
#pragma unroll 4
        for (int e = tid; e < G * Dk; e += blockDim.x) Qs[e / Dk][e % Dk] = qh[e] * scale;
        if constexpr (Q8) {  // turned by H, a 32-block per warp
            __syncthreads();
            for (int blk = warp; blk < G * Dk / 32; blk += NW) {
                float* r = &Qs[blk * 32 / Dk][blk * 32 % Dk];
                r[lane] = wht32_warp(r[lane], lane);
                if constexpr (QI) {  // the cache's rounding, the scale kept in float
                    const float d = q8_round_warp(
                        r[lane], reinterpret_cast<int8_t*>(&Qi[blk * 32 / Dk][0]) + blk * 32 % Dk + lane);
                    if (lane == 0) Qd[blk * 32 / Dk][blk * 32 % Dk / 32] = d;
                }
            }
        }
    }
    __syncthreads();

    // WV (a Q8_0 cache, one or two query heads a kv head): lane owns 8 consecutive V dims of a row,
    // so a load instruction takes 8 values a lane and KPI keys a warp; with a lane on 2 dims of every
    // 64, an MHA tile is 4 narrow loads a key and 64 dims (levels and scales apart). Over f16 rows
    // (2 narrow loads a key and 64 dims) the wide layout measured slower (BENCHMARKS, session 27).
    // A Q8_0 row is whole 32-dim blocks (CudaKV), so a lane's 8 dims never straddle its end.
    constexpr bool WV = Q8 && GM <= 2;
    constexpr int NA = WV ? 8 : 2 * NC;                   // accumulated V dims a lane
    constexpr int LPR = NC == 1 ? 8 : NC == 2 ? 16 : 32;  // WV: lanes a row (Dv <= 8 * LPR)
    float m[GM], l[GM], acc[GM][NA];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int c = 0; c < NA; ++c) acc[g][c] = 0.f;
    }
    const int* btab = block_tables + (size_t)b * max_blocks;
    // Key k0 + lane's cache slot. Keys past `hi` borrow lane 0's slot (k0 < hi: always a written
    // key), so the V rows they add with p = 0 are finite; a never-written row may hold NaN bits,
    // and 0 * NaN = NaN.
    auto tile_slot = [&](int k0) {
        const int n = k0 + lane;
        const int sl = n < hi ? btab[n / block_size] * block_size + n % block_size : 0;
        const int sl0 = __shfl_sync(FULL_MASK, sl, 0);
        return n < hi ? sl : sl0;
    };
    constexpr int ELT = Q8 ? 1 : 2;  // bytes per K value
    unsigned char* kbuf = Sh + warp * 32 * KROW;
    auto stage = [&](int sl) {  // the 32 K rows at the lanes' slots sl into kbuf
        const int cpr = Dk * ELT / 16;  // 16-byte chunks per row; chunk e of the tile: row e / cpr
        const unsigned char* kb = static_cast<const unsigned char*>(kc);
        for (int i = 0; i < cpr; ++i) {
            const int e = lane + 32 * i, r = e / cpr, c = e - r * cpr;
            const int sr = __shfl_sync(FULL_MASK, sl, r);
            cp_async16(kbuf + r * KROW + 16 * c, kb + ((size_t)sr * Hkv + kvh) * Dk * ELT + 16 * c);
        }
        cp_async_commit();
    };
    // Staged Q8_0 tiles of one or two query heads (measured with WV): lane j's K scales, loaded with
    // the tile's copy (a load at scoring time would put a memory round trip in front of every tile).
    // Dk <= 64 * NC there.
    constexpr bool KPRE = Q8 && ST && GM <= 2;
    constexpr int KSC = KPRE ? 2 * NC : 1;
    float ksc[KSC];
    auto load_kscales = [&](int sl, float* o) {
        if constexpr (KPRE) {
            const __half* kd = ks + ((size_t)sl * Hkv + kvh) * (Dk >> 5);
#pragma unroll
            for (int i = 0; i < KSC; ++i) o[i] = i < (Dk >> 5) ? __half2float(__ldg(kd + i)) : 0.f;
        }
    };
    int slot = 0;
    if constexpr (ST) {
        if (lo + warp * 32 < hi) {
            slot = tile_slot(lo + warp * 32);
            stage(slot);
            load_kscales(slot, ksc);
        }
    }
    for (int k0 = lo + warp * 32; k0 < hi; k0 += NW * 32) {
        const int n = k0 + lane;
        const bool valid = n < hi;
        const bool more = k0 + NW * 32 < hi;  // this warp has a next tile
        int next = 0;
        if constexpr (ST) {
            if (more) next = tile_slot(k0 + NW * 32);  // its table lookup overlaps this tile's scoring
            cp_async_wait0();
            __syncwarp();  // every lane's copies have landed
        } else {
            slot = tile_slot(k0);
        }
        float s[GM];
#pragma unroll
        for (int g = 0; g < GM; ++g) s[g] = 0.f;
        if (Q8 && valid) {
            const size_t row = (size_t)slot * Hkv + kvh;
            const uint4* kp = ST ? reinterpret_cast<const uint4*>(kbuf + lane * KROW)
                                 : reinterpret_cast<const uint4*>(static_cast<const int8_t*>(kc) + row * Dk);
            auto block = [&](int d32, float dsc) {  // s[g] += dsc * <q's 32-block d32, the levels>
                const uint4 r0 = ld_k16<ST>(kp + 2 * d32), r1 = ld_k16<ST>(kp + 2 * d32 + 1);
                const unsigned w[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
                if constexpr (QI) {
#pragma unroll
                    for (int g = 0; g < GM; ++g) {
                        if (g < G) {
                            const int4 qa = *reinterpret_cast<const int4*>(&Qi[g][8 * d32]);
                            const int4 qb = *reinterpret_cast<const int4*>(&Qi[g][8 * d32 + 4]);
                            int u = __dp4a(static_cast<int>(w[0]), qa.x, 0);
                            u = __dp4a(static_cast<int>(w[1]), qa.y, u); u = __dp4a(static_cast<int>(w[2]), qa.z, u);
                            u = __dp4a(static_cast<int>(w[3]), qa.w, u); u = __dp4a(static_cast<int>(w[4]), qb.x, u);
                            u = __dp4a(static_cast<int>(w[5]), qb.y, u); u = __dp4a(static_cast<int>(w[6]), qb.z, u);
                            u = __dp4a(static_cast<int>(w[7]), qb.w, u);
                            s[g] = fmaf(dsc * Qd[g][d32], static_cast<float>(u), s[g]);
                        }
                    }
                } else {
                    float f[32];
#pragma unroll
                    for (int i = 0; i < 8; ++i) sbytes4(w[i], f + 4 * i);
#pragma unroll
                    for (int g = 0; g < GM; ++g) {
                        if (g < G) {
                            float u = 0.f;
#pragma unroll
                            for (int i4 = 0; i4 < 8; ++i4) {
                                const float4 qa = *reinterpret_cast<const float4*>(&Qs[g][32 * d32 + 4 * i4]);
                                u = fmaf(qa.x, f[4 * i4], u); u = fmaf(qa.y, f[4 * i4 + 1], u);
                                u = fmaf(qa.z, f[4 * i4 + 2], u); u = fmaf(qa.w, f[4 * i4 + 3], u);
                            }
                            s[g] = fmaf(dsc, u, s[g]);
                        }
                    }
                }
            };
            if constexpr (KPRE) {  // the scales sit in registers, indexed by the unrolled d32
#pragma unroll
                for (int d32 = 0; d32 < KSC; ++d32)
                    if (d32 < (Dk >> 5)) block(d32, ksc[d32]);
            } else {
                const __half* kd = ks + row * (Dk >> 5);
#pragma unroll 2
                for (int d32 = 0; d32 < (Dk >> 5); ++d32) block(d32, __half2float(kd[d32]));
            }
        } else if (valid) {
            const uint4* kp = ST ? reinterpret_cast<const uint4*>(kbuf + lane * KROW)
                                 : reinterpret_cast<const uint4*>(static_cast<const __half*>(kc) + ((size_t)slot * Hkv + kvh) * Dk);
#pragma unroll 8  // the unrolled loads issue together: one memory round trip per 64 dims, not one per 8
            for (int d8 = 0; d8 < (Dk >> 3); ++d8) {
                const uint4 raw = ld_k16<ST>(kp + d8);
                const __half2* h = reinterpret_cast<const __half2*>(&raw);
                const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]);
                const float2 f2 = __half22float2(h[2]), f3 = __half22float2(h[3]);
#pragma unroll
                for (int g = 0; g < GM; ++g) {
                    if (g < G) {
                        const float4 qa = *reinterpret_cast<const float4*>(&Qs[g][8 * d8]);
                        const float4 qb = *reinterpret_cast<const float4*>(&Qs[g][8 * d8 + 4]);
                        float u = s[g];
                        u = fmaf(qa.x, f0.x, u); u = fmaf(qa.y, f0.y, u); u = fmaf(qa.z, f1.x, u); u = fmaf(qa.w, f1.y, u);
                        u = fmaf(qb.x, f2.x, u); u = fmaf(qb.y, f2.y, u); u = fmaf(qb.z, f3.x, u); u = fmaf(qb.w, f3.y, u);
                        s[g] = u;
                    }
                }
            }
        }
        if constexpr (ST) {
            __syncwarp();  // every lane has read its row: the buffer takes the next tile
            if (more) {  // this tile's scores are done with its scales
                stage(next);
                load_kscales(next, ksc);
            }
        }
        float pr[GM];
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            pr[g] = 0.f;
            if (g >= G) continue;
            float si = s[g];
            if (softcap > 0.f) si = softcap * tanhf(si / softcap);
            si = valid ? si : -INFINITY;
            const float m_new = fmaxf(m[g], warp_max(si));  // lane 0's key is always valid
            const float corr = __expf(m[g] - m_new);
            pr[g] = valid ? __expf(si - m_new) : 0.f;
            l[g] = l[g] * corr + warp_sum(pr[g]);
            m[g] = m_new;
#pragma unroll
            for (int c = 0; c < NA; ++c) acc[g][c] *= corr;
        }
        // All 32 keys of the tile, VB loads issued before any is used (a load per key, waited for
        // in turn, made the tile 32 memory round trips). Keys past `hi` have p = 0 and a written
        // key's slot, so they add nothing and need no branch.
        if constexpr (WV) {
            constexpr int KPI = 32 / LPR, NB = 32 / KPI;         // keys a load, loads a tile
            constexpr int VB = NB < 16 ? NB : 16;  // loads in flight a lane: 8 levels and a 2-byte scale each
            const int r = lane / LPR, c8 = lane % LPR;
            const bool own = 8 * c8 < Dv;  // lanes past the row's end (Dv < 8 * LPR) hold no dims
            for (int j0 = 0; j0 < NB; j0 += VB) {
                uint2 raw[VB];  // 8 levels
                float dsc[VB];
#pragma unroll
                for (int i = 0; i < VB; ++i) {
                    const int sj = __shfl_sync(FULL_MASK, slot, (j0 + i) * KPI + r);
                    const size_t row = (size_t)sj * Hkv + kvh;
                    raw[i] = make_uint2(0u, 0u);
                    dsc[i] = 0.f;
                    if (own) {
                        raw[i] = __ldg(reinterpret_cast<const uint2*>(static_cast<const int8_t*>(vc) + row * Dv) + c8);
                        dsc[i] = __half2float(vs[row * (Dv >> 5) + (c8 >> 2)]);
                    }
                }
#pragma unroll
                for (int i = 0; i < VB; ++i) {
                    float f[8];
                    sbytes4(raw[i].x, f);
                    sbytes4(raw[i].y, f + 4);
#pragma unroll
                    for (int g = 0; g < GM; ++g) {
                        if (g >= G) continue;
                        const float pj = __shfl_sync(FULL_MASK, pr[g], (j0 + i) * KPI + r) * dsc[i];
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pj, f[e], acc[g][e]);
                    }
                }
            }
        } else {
            constexpr int VB = NC == 1 ? 32 : NC == 2 ? 16 : 8;
            for (int j0 = 0; j0 < 32; j0 += VB) {
                float2 vv[VB][NC];
#pragma unroll
                for (int jj = 0; jj < VB; ++jj) {
                    const int sj = __shfl_sync(FULL_MASK, slot, j0 + jj);
                    const size_t row = (size_t)sj * Hkv + kvh;
                    if constexpr (Q8) {
                        const unsigned short* vp = reinterpret_cast<const unsigned short*>(static_cast<const int8_t*>(vc) + row * Dv);
                        const __half* vd = vs + row * (Dv >> 5);
#pragma unroll
                        for (int c = 0; c < NC; ++c) {
                            const int d2 = lane + 32 * c;
                            vv[jj][c] = make_float2(0.f, 0.f);
                            if (2 * d2 < Dv) {
                                const float2 lv = sbytes2(vp[d2]);
                                const float dsc = __half2float(vd[d2 >> 4]);
                                vv[jj][c] = make_float2(dsc * lv.x, dsc * lv.y);
                            }
                        }
                    } else {
                        const __half2* vp = reinterpret_cast<const __half2*>(static_cast<const __half*>(vc) + row * Dv);
#pragma unroll
                        for (int c = 0; c < NC; ++c) {
                            const int d2 = lane + 32 * c;
                            vv[jj][c] = 2 * d2 < Dv ? __half22float2(vp[d2]) : make_float2(0.f, 0.f);
                        }
                    }
                }
#pragma unroll
                for (int jj = 0; jj < VB; ++jj) {
#pragma unroll
                    for (int g = 0; g < GM; ++g) {
                        if (g >= G) continue;
                        const float pj = __shfl_sync(FULL_MASK, pr[g], j0 + jj);
#pragma unroll
                        for (int c = 0; c < NC; ++c) {
                            acc[g][2 * c] = fmaf(pj, vv[jj][c].x, acc[g][2 * c]);
                            acc[g][2 * c + 1] = fmaf(pj, vv[jj][c].y, acc[g][2 * c + 1]);
                        }
                    }
                }
            }
        }
        if constexpr (ST) slot = next;
    }
    if constexpr (ST) __syncthreads();  // As overlays the other warps' K tiles

    // Merge the warps' softmax states; then a partial for attn_combine, or the normalised output.
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g >= G) continue;
        if (lane == 0) { Ms[warp][g] = m[g]; Ls[warp][g] = l[g]; }
        if constexpr (WV) {  // the KPI lanes on the same dims (different keys) add up
#pragma unroll
            for (int e = 0; e < 8; ++e)
#pragma unroll
                for (int o = LPR; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(FULL_MASK, acc[g][e], o);
            if (lane < LPR && 8 * lane < Dv) {
#pragma unroll
                for (int e = 0; e < 8; ++e) As[warp][g][8 * lane + e] = acc[g][e];
            }
        } else {
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                As[warp][g][2 * (lane + 32 * c)] = acc[g][2 * c];
                As[warp][g][2 * (lane + 32 * c) + 1] = acc[g][2 * c + 1];
            }
        }
    }
    __syncthreads();
    for (int e = tid; e < G * Dv; e += blockDim.x) {
        const int g = e / Dv, d = e - g * Dv, h = kvh * G + g;
        float M, L, A;
        merge_warp_states<NW>(&Ms[0][g], &Ls[0][g], GM, &As[0][g][d], GM * NC * 64, M, L, A);
        float val = n_splits == 1 ? normalised_row(M, L, A, sinks, h) : A;
        // Back from the turned space. Dv is a multiple of 32 here, so a warp's 32 consecutive e
        // are one 32-block of one row, lane j its value j, and every lane of it takes this turn.
        if constexpr (Q8) val = wht32_warp(val, lane);
        store_slice_row(part, out, t, Hq, h, split, n_splits, Dv, d, val, M, L);
    }
    if (n_splits > 1 && counters)
        attn_dec_merge<2 * NC>(part, out, sinks, counters + b * Hkv + kvh, t, kvh, G, Hq, Dv, n_splits, oq, od);
}

// attn_dec_g<GM>_n<NC>_q8: the same over a Q8_0 cache (levels kc/vc, scales ks/vs). NC <= 2 stage
// their K tiles through shared memory (ST); at NC 3 and 4 the tiles would pass the 48 KiB of
// static shared memory, so lanes read their rows from global memory.
#define ATTN_DEC(GM, NC)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                    \
    attn_dec_g##GM##_n##NC(const float* q, const __half* kc, const __half* vc, float* out,               \
                           const int* q_starts, const int* positions, const int* ctx_lens,               \
                           const int* block_tables, int max_blocks, int block_size, int Hq, int Hkv,     \
                           int Dk, int Dv, float scale, int window, const float* sinks, float softcap,   \
                           int n_splits, float* part, int* counters, int8_t* oq, float* od) { pdl_enter(); \
        attn_dec_impl<GM, NC, false, (NC <= 2)>(q, kc, vc, nullptr, nullptr, out, q_starts, positions,   \
                                                ctx_lens, block_tables, max_blocks, block_size, Hq, Hkv, \
                                                Dk, Dv, scale, window, sinks, softcap, n_splits, part,   \
                                                counters, oq, od);                                       \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                    \
    attn_dec_g##GM##_n##NC##_q8(const float* q, const int8_t* kc, const int8_t* vc, const __half* ks,    \
                                const __half* vs, float* out, const int* q_starts, const int* positions, \
                                const int* ctx_lens, const int* block_tables, int max_blocks,            \
                                int block_size, int Hq, int Hkv, int Dk, int Dv, float scale, int window, \
                                const float* sinks, float softcap, int n_splits, float* part,            \
                                int* counters, int8_t* oq, float* od) { pdl_enter();                     \
        attn_dec_impl<GM, NC, true, (NC <= 2)>(q, kc, vc, ks, vs, out, q_starts, positions, ctx_lens,    \
                                               block_tables, max_blocks, block_size, Hq, Hkv, Dk, Dv,    \
                                               scale, window, sinks, softcap, n_splits, part, counters,  \
                                               oq, od);                                                  \
    }
#define ATTN_DEC_NC(GM) ATTN_DEC(GM, 1) ATTN_DEC(GM, 2) ATTN_DEC(GM, 3) ATTN_DEC(GM, 4)
ATTN_DEC_NC(1)
ATTN_DEC_NC(2)
ATTN_DEC_NC(4)
ATTN_DEC_NC(8)
