// Matrix kernels on GGUF-quantized weights kept in their file layout in VRAM.
//
//   gemv_<fmt>_<nt>  y[t] = W x[t] for nt <= 8 tokens (decode) and the per-slot MoE GEMV.
//                    One warp owns R rows. It streams each row's bytes chunk by chunk into shared
//                    memory with 16-byte cp.async copies (aligned down, so the raw bytes of any
//                    format arrive as full-width coalesced loads), double-buffered so the next
//                    chunk is in flight while this one is decoded. Each lane decodes 8-weight parts
//                    and reuses the x values it loaded for all R rows and the weights for all nt
//                    tokens; f32 math, warp-shuffle reduction at the end.
//   gemm_<fmt>_<bm>  tiled GEMM for larger T: 128 weight rows x BM tokens per block, k-tiles of 64;
//                    weights are decoded into an f16 tile, activations converted to f16, products on
//                    tensor cores (WMMA 16x16x16) with f32 accumulation. Each weight byte is read
//                    once per BM tokens. Activation rows are scaled by a power of two before the f16
//                    conversion (undone in the epilogue), so any finite float32 input is safe.
//   gemm_moe_<fmt>_<bm>  the same GEMM over MoE experts: row tiles of one expert's slots, gathered through
//                    the permutation moe_group wrote, results scattered to y[slot].
//   moe_group        sorts the MoE slots by expert on the device (counts, offsets, tile table, perm).
//   gemv_<fmt>_<nt>[_k4]_i8  the GEMV on an input rounded to int8 (dp4a products; integer formats; the
//                    default for matrices of >= 4 Mi weights, see ACT_I8).
//   embed_<fmt>      y[t] = dequantized row ids[t].
// Kernels never allocate, copy to the host or synchronise, so launches can be captured in a graph.
#include <mma.h>
#include "common.cuh"
#include "moe_group.cuh"
#include "quant_common.cuh"

using namespace oq;

namespace {

constexpr int GEMV_WARPS = 4;  // warps per block: independent rows (KS = 1) or one row group (KS = 4)
constexpr int GEMV_R = 2;      // rows per warp: each x load is reused R times

template <class F>
struct GemvSmem {
    // one row chunk plus the up-to-15-byte misalignment of its start, rounded to 16; the int8 GEMV
    // of the 32-weight formats reads its BlockWords past a chunk's last block
    static constexpr int TAIL = F::QK == 32 ? BlockWords<F::TS>::TAIL : 0;
    static constexpr int ROW = ((F::CHB * F::TS + 15 + TAIL + 15) / 16) * 16;
};

// A lane's whole block as BlockWords (the 32-weight formats' int8 GEMV), or nothing (the K-quants' parts)
struct NoWords {};
template <bool ON, class F>
__device__ __forceinline__ auto lane_block(const uint8_t* b) {
    if constexpr (ON) return BlockWords<F::TS>(b); else return NoWords{};
}

// Reads up to 15 bytes past the end of a row chunk (to finish a 16-byte vector); QuantWeight pads
// its allocation by 16 bytes so the last row's tail stays inside it.
template <class F>
__device__ __forceinline__ int stage_chunk(uint8_t* dst, const uint8_t* src, int nbytes, int lane) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(src) & ~uintptr_t(15);
    const int head = int(reinterpret_cast<uintptr_t>(src) - a);
    const int nvec = (head + nbytes + 15) >> 4;
    for (int i = lane; i < nvec; i += 32) cp_async16(dst + 16 * i, reinterpret_cast<const uint8_t*>(a) + 16 * i);
    return head;
}

// KS = 1: each warp owns R rows and walks all of k. KS = GEMV_WARPS: the block's warps share R rows
// and take every KS-th k-chunk each, summed through shared memory at the end. A matrix with few
// rows (qwen2.5's 896) leaves most SMs idle at KS = 1, and each warp's chunks are a chain of
// dependent global loads; splitting k puts 4x the loads in flight per row.
// The input as the GEMV reads it: ACT = 0 float rows; ACT = 4 (I8): the input was quantized by
// quantize_x8 to signed bytes xq (passed as x) with one scale per 32 elements (xd): products are
// dp4a on the weights' own integers, 4 per instruction, instead of a float conversion and an FMA per weight, which kept the K-quant GEMVs at a third of
// the H100's bandwidth (phi3-mini Q4_K 3072x9216: 17.3 us, ~950 GB/s, CUPTI trace).
constexpr int ACT_I8 = 4;

// Under programmatic dependent launch (cuda_graph.py) a dense GEMV issues its first weight chunk's
// copies before pdl_enter: the weight bytes are on their way while the kernel before it still runs,
// and only x, the scales and y wait for it. The MoE GEMV waits first (its expert comes from the
// router's output), except the pair (PAIR, below). The GEMV entry points leave pdl_enter to gemv_impl.

// PAIR (gemv_*_1[_k4]_i8_pair): the per-slot MoE GEMV of two matrices on one input (gate and up: W2,
// bias2), the second half of the grid on W2 and bias2 into the rows after the first half's. Its
// launch always follows the quantize_x8 of its input (cuda_quant.moe_matmul_pair), so the router's
// expert ids are at least two kernels back: under programmatic dependent launch a kernel starts only
// once every block of the one before it has passed its own wait, i.e. after the kernel before that
// has finished. So a pair reads its expert id and issues its first weight chunk before its wait, as
// the dense GEMVs do, instead of after.
template <class F, int NT, int KS, int ACT = 0, bool PAIR = false>
__device__ __forceinline__ void gemv_impl(const float* __restrict__ x, const uint8_t* __restrict__ W,
                                          float* __restrict__ y, const float* __restrict__ bias,
                                          const int* __restrict__ expert_ids, int T, int n, int k,
                                          long long expert_stride, int top_k, int x_per_slot, int accumulate,
                                          const float* __restrict__ xd = nullptr, const uint8_t* W2 = nullptr,
                                          const float* bias2 = nullptr) {
    constexpr int R = GEMV_R, SROW = GemvSmem<F>::ROW;
    // Parts per lane. K-quants: 4 (32 weights under one scale pair) because unpacking their 6-bit
    // scales costs as much as the weights. Others: 1, so a warp's float x loads stay contiguous (4
    // parts per lane put lanes 128 B apart and made every x load touch 32 cache lines: 2x slower, v2
    // run). On the int8 input a whole 32-weight block a lane is 32 bytes of x in two vector loads
    // and its weight bytes in a few aligned words (BlockWords), where a part a lane made 4-byte x
    // loads 16 bytes apart across the warp and up to five narrow weight loads a part.
    constexpr bool I8_BLOCK = ACT == ACT_I8 && F::QK == 32;
    constexpr int G = F::QK == 256 || I8_BLOCK ? 4 : 1;
    __shared__ __align__(16) uint8_t sm[GEMV_WARPS][2][R][SROW];
    static_assert(KS == 1 || KS == GEMV_WARPS, "k is split over all of a block's warps or none");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = KS == 1 ? (blockIdx.x * GEMV_WARPS + warp) * R : blockIdx.x * R;
    const int kw = KS == 1 ? 0 : warp;  // this warp's first chunk
    // whole warp (KS = 1) or whole block (KS > 1) leaves together: the only block barrier is below
    if (row0 >= n) return;  // touches no memory: needs no wait
    const bool wait_first = expert_ids != nullptr && !PAIR;
    if (wait_first) pdl_enter();

    // MoE slot: blockIdx.y = t*top_k + j picks expert ids[slot]; plain matmul has one slot.
    int slot = blockIdx.y;
    if constexpr (PAIR) {
        if (slot >= static_cast<int>(gridDim.y >> 1)) {
            slot -= gridDim.y >> 1;
            W = W2;
            bias = bias2;
            y += (long long)(gridDim.y >> 1) * n;
        }
    }
    if (expert_ids) {
        const int e = PAIR ? __ldcg(expert_ids + slot) : expert_ids[slot];  // (PAIR: from L2, before the wait)
        W += e * expert_stride;
        if (bias) bias += (long long)e * n;
        const long long row = x_per_slot ? slot : slot / top_k;
        if constexpr (ACT == ACT_I8) {
            // quantize_x8's rows: k signed bytes each (x is that buffer), k / 32 scales each
            x = reinterpret_cast<const float*>(reinterpret_cast<const int8_t*>(x) + row * k);
            xd += row * (k / 32);
        } else {
            x += row * k;
        }
        y += (long long)slot * n;
    }
    const int nblk = k / F::QK;
    const long long RB = (long long)nblk * F::TS;
    const uint8_t* rowp[R];
#pragma unroll
    for (int r = 0; r < R; r++) rowp[r] = W + (long long)min(row0 + r, n - 1) * RB;  // tail rows: re-read the last row, not written

    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.f;

    const int nch = (nblk + F::CHB - 1) / F::CHB;
    // buffer of chunk c: its ordinal among this warp's chunks, mod 2
    auto buf = [&](int c) { return ((c - kw) / KS) & 1; };
    auto issue = [&](int c) {
        const int b0 = c * F::CHB, nb = min(F::CHB, nblk - b0);
#pragma unroll
        for (int r = 0; r < R; r++) stage_chunk<F>(sm[warp][buf(c)][r], rowp[r] + (long long)b0 * F::TS, nb * F::TS, lane);
    };
    if (kw < nch) issue(kw);
    cp_async_commit();
    if (!wait_first) pdl_enter();
    for (int c = kw; c < nch; c += KS) {
        if (c + KS < nch) issue(c + KS);
        cp_async_commit();  // an empty group on the last chunk keeps wait_group 1 meaning "chunk c landed"
        cp_async_wait1();
        __syncwarp();       // other lanes' copies of chunk c are visible after this
        const int b0 = c * F::CHB, ngroups = min(F::CHB, nblk - b0) * (F::NP / G);
        const uint8_t* cb[R];  // chunk start inside its aligned-down copy (recomputed: no run-time-indexed array)
#pragma unroll
        for (int r = 0; r < R; r++)
            cb[r] = sm[warp][buf(c)][r] + int(reinterpret_cast<uintptr_t>(rowp[r] + (long long)b0 * F::TS) & 15);
        // a lane takes G consecutive parts that share their scales: scales are decoded once per group
        // and applied to the group's unscaled sums
        for (int g = lane; g < ngroups; g += 32) {
            const int bl = (G * g) / F::NP, p0 = (G * g) % F::NP;
            const int e0 = (b0 + bl) * F::QK;
            float s0[R][NT], s1[R][NT], x0[NT], x1[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) {
                x0[t] = x1[t] = 0.f;
#pragma unroll
                for (int r = 0; r < R; r++) s0[r][t] = s1[r][t] = 0.f;
            }
            if constexpr (ACT == ACT_I8) {
                // A group's first runs share one 32-element x block per token, and so do its second
                // runs (tokens >= T: harmless duplicate loads, never written).
                int xa[G][NT], xb[G][NT], sa[NT], sb[NT], oa, ob;
                float da[NT], db[NT];
                F::offs(p0, oa, ob);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    const long long row = NT == 1 ? 0 : min(t, T - 1);
                    const int8_t* xq = reinterpret_cast<const int8_t*>(x) + row * k + e0;
                    da[t] = __ldg(xd + row * (k / 32) + ((e0 + oa) >> 5));
                    db[t] = __ldg(xd + row * (k / 32) + ((e0 + ob) >> 5));
                    sa[t] = sb[t] = 0;
                    if constexpr (F::QK == 256) {
                        // the K-quants' aligned groups: part p0 + j's runs start 4j bytes after part
                        // p0's (offs), so each run of the group is 16 contiguous, 16-aligned bytes of
                        // x (e0 and k are multiples of 256): one vector load each instead of four
                        const int4 va = __ldg(reinterpret_cast<const int4*>(xq + oa));
                        const int4 vb = __ldg(reinterpret_cast<const int4*>(xq + ob));
                        xa[0][t] = va.x; xa[1][t] = va.y; xa[2][t] = va.z; xa[3][t] = va.w;
                        xb[0][t] = vb.x; xb[1][t] = vb.y; xb[2][t] = vb.z; xb[3][t] = vb.w;
                    } else {
                        // a whole block a lane (p0 = 0): its 32 bytes of x in two vector loads, each
                        // part's runs the words at offs(j) / 4 (multiples of 4; constant once j is
                        // unrolled: register moves)
                        const int4 v0 = __ldg(reinterpret_cast<const int4*>(xq));
                        const int4 v1 = __ldg(reinterpret_cast<const int4*>(xq + 16));
                        const int w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
                        for (int j = 0; j < G; j++) {
                            int o0, o1;
                            F::offs(p0 + j, o0, o1);
                            xa[j][t] = w[o0 >> 2];
                            xb[j][t] = w[o1 >> 2];
                        }
                    }
                    if constexpr (F::MIN || F::QB)
#pragma unroll
                        for (int j = 0; j < G; j++) {
                            sa[t] = __dp4a(xa[j][t], 0x01010101, sa[t]);
                            sb[t] = __dp4a(xb[j][t], 0x01010101, sb[t]);
                        }
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int ia[NT], ib[NT];
#pragma unroll
                    for (int t = 0; t < NT; t++) ia[t] = ib[t] = 0;
                    // a whole block a lane: its bytes in a few aligned word loads, not five byte loads a part
                    const auto blk = lane_block<I8_BLOCK, F>(cb[r] + bl * F::TS);
#pragma unroll
                    for (int j = 0; j < G; j++) {
                        uint32_t lo, hi;  // a row's integers are unpacked once for all tokens
                        if constexpr (I8_BLOCK) F::qi_at(blk, j, lo, hi);
                        else F::qi(cb[r] + bl * F::TS, p0 + j, lo, hi);
#pragma unroll
                        for (int t = 0; t < NT; t++) {
                            ia[t] = __dp4a(static_cast<int>(lo), xa[j][t], ia[t]);
                            ib[t] = __dp4a(static_cast<int>(hi), xb[j][t], ib[t]);
                        }
                    }
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        s0[r][t] = da[t] * float(ia[t] - F::QB * sa[t]);
                        s1[r][t] = db[t] * float(ib[t] - F::QB * sb[t]);
                    }
                }
                if constexpr (F::MIN)
#pragma unroll
                    for (int t = 0; t < NT; t++) { x0[t] = da[t] * float(sa[t]); x1[t] = db[t] * float(sb[t]); }
            } else {
#pragma unroll
            for (int j = 0; j < G; j++) {
                int o0, o1;
                F::offs(p0 + j, o0, o1);
                float4 xa[NT], xb[NT];
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    // tokens >= T: harmless duplicate loads
                    const float* xt = x + (long long)min(t, T - 1) * k + e0;
                    xa[t] = __ldg(reinterpret_cast<const float4*>(xt + o0));
                    xb[t] = __ldg(reinterpret_cast<const float4*>(xt + o1));
                    if constexpr (F::MIN) {  // sum of x under each run, shared by all rows
                        x0[t] += (xa[t].x + xa[t].y) + (xa[t].z + xa[t].w);
                        x1[t] += (xb[t].x + xb[t].y) + (xb[t].z + xb[t].w);
                    }
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float q[8];
                    F::qv(cb[r] + bl * F::TS, p0 + j, q);
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        float u = s0[r][t], v = s1[r][t];
                        u = fmaf(q[0], xa[t].x, u); v = fmaf(q[4], xb[t].x, v);
                        u = fmaf(q[1], xa[t].y, u); v = fmaf(q[5], xb[t].y, v);
                        u = fmaf(q[2], xa[t].z, u); v = fmaf(q[6], xb[t].z, v);
                        u = fmaf(q[3], xa[t].w, u); v = fmaf(q[7], xb[t].w, v);
                        s0[r][t] = u; s1[r][t] = v;
                    }
                }
            }
            }  // float input
#pragma unroll
            for (int r = 0; r < R; r++) {
                float a0, a1, m0, m1;
                F::sc(cb[r] + bl * F::TS, p0, a0, a1, m0, m1);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float v = fmaf(a0, s0[r][t], a1 * s1[r][t]);
                    if constexpr (F::MIN) v = fmaf(m0, x0[t], fmaf(m1, x1[t], v));
                    acc[r][t] += v;
                }
            }
        }
        __syncwarp();  // all lanes done reading this buffer before chunk c+2 overwrites it
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = acc[r][t];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][t] = v;
        }
    if constexpr (KS > 1) {
        __shared__ float red[GEMV_WARPS][R][NT];
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int t = 0; t < NT; t++) red[warp][r][t] = acc[r][t];
        __syncthreads();
        if (warp) return;
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float v = 0.f;
#pragma unroll
                for (int w = 0; w < GEMV_WARPS; w++) v += red[w][r][t];
                acc[r][t] = v;
            }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = row0 + r;
            if (row >= n) continue;
            const float b = bias ? bias[row] : 0.f;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= T) continue;
                float* yp = y + (long long)t * n + row;
                *yp = acc[r][t] + b + (accumulate ? *yp : 0.f);
            }
        }
    }
}

// ---------------------------------------------------------------- tensor-core GEMM
constexpr int GBN = 128, GBK = 64, GLD = GBK + 8;  // +8 halves per row: rows land on different banks
constexpr int GEMM_THREADS = 256;
// GEMM tiles with BM <= ORCD_GEMM_PIPE use the unrolled, all-loads-first k-step (more registers: 48-64 at
// BM 16/32, ~128 at BM 64, ~170 at BM 128, i.e. 1 block/SM, hence not the default there); larger BM the
// rolled loops. 0 = rolled everywhere (cuda_runtime.module_options passes Tuning.gemm_pipe).
// 64 measured faster on the H100 (2026-11-23): qwen2.5-0.5b's B=64 step 6.87 -> 5.95 ms, gpt-oss-20b's
// 33.5 -> 31.7 ms, and with BM 64 prefill tiles (cuda_quant.GEMM_MAX_BM) pp512 +17-28 %.
#ifndef ORCD_GEMM_PIPE
#define ORCD_GEMM_PIPE 64
#endif

template <class F, int BM, bool BLK = false>
__device__ __forceinline__ void gemm_impl(const float* __restrict__ x, const uint8_t* __restrict__ W,
                                          float* __restrict__ y, const float* __restrict__ bias,
                                          int T, int n, int k, int accumulate, int kchunk, const MoeGroup mg) {
    // Split-K: blockIdx.z takes k range [z*kchunk, (z+1)*kchunk). With more than one split the
    // partial sums are atomically added to y, which gemm_init has set to bias (+ old y) first.
    // Activation rows are scaled by a power of two (per row and per k range) before the f16
    // conversion and unscaled in the epilogue, so any finite float32 activation works.
    // Grouped MoE (mg.ws set, T = tokens): blockIdx.y is a row tile of one expert; its rows are
    // gathered from x through perm and scattered to y[slot]; no split-K, no accumulate.
    using namespace nvcuda;
    constexpr int MF = BM / 16;
    constexpr int SMEM = (BM + GBN) * GLD * 2;
    static_assert(SMEM >= 8 * 256 * 4, "epilogue scratch must fit in the tile memory");
    __shared__ __align__(128) uint8_t smem[SMEM];
    __shared__ int xrow[BM], yrow[BM];      // source row of x / destination row of y per tile row (-1: none)
    __shared__ float rscale[BM], rinv[BM];  // per-row power-of-two scale and its inverse
    __half* As = reinterpret_cast<__half*>(smem);   // [BM][GLD]  activations
    __half* Bs = As + BM * GLD;                     // [GBN][GLD] weights, row n holds k
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int n0 = blockIdx.x * GBN;
    const int nblk = k / F::QK;
    const long long RB = (long long)nblk * F::TS;

    if (mg.ws) {
        if (!moe_tile<BM, GEMM_THREADS>(mg, T, n, W, bias, xrow, yrow)) return;
    } else {
        for (int r = tid; r < BM; r += GEMM_THREADS) {
            const int t = blockIdx.y * BM + r;
            xrow[r] = yrow[r] = t < T ? t : -1;
        }
    }
    const int kbeg = blockIdx.z * kchunk, kend = min(k, kbeg + kchunk);
    const bool split = gridDim.z > 1;
    __syncthreads();
    // per-row max |x| over this block's k range (one warp per row, coalesced float4 loads)
    for (int r = warp; r < BM; r += GEMM_THREADS / 32) {
        const int xr = xrow[r];
        float mx = 0.f;
        if (xr >= 0) {
            const float* xp = x + (long long)xr * k;
#pragma unroll 4
            for (int c = kbeg + 4 * lane; c < kend; c += 128) {
                const float4 v = __ldg(reinterpret_cast<const float4*>(xp + c));
                mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        if (lane == 0) pow2_scale(mx, rscale[r], rinv[r]);
    }
    __syncthreads();

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[MF];
#pragma unroll
    for (int i = 0; i < MF; i++) wmma::fill_fragment(acc[i], 0.f);

    for (int kk = kbeg; kk < kend; kk += GBK) {
        if constexpr (BM <= ORCD_GEMM_PIPE) {
        // Fixed trip counts, fully unrolled, loads made unconditional (clamped to valid addresses, the
        // value zeroed by a select): the compiler can issue every global load of this k-step before the
        // first decode, so a k-step costs about one memory latency instead of one per loop iteration.
        // activations: BM x 64 floats, scaled per row -> f16; missing rows and columns past k are zero
#pragma unroll
        for (int it = 0; it < BM * (GBK / 4) / GEMM_THREADS; it++) {
            const int i = tid + it * GEMM_THREADS;
            const int r = i / (GBK / 4), c = (i % (GBK / 4)) * 4;
            const int xr = xrow[r], col = kk + c;
            const bool ok = xr >= 0 && col < k;
            float4 v = __ldg(reinterpret_cast<const float4*>(x + (long long)max(xr, 0) * k + min(col, k - 4)));
            const float s = rscale[r];
            v.x *= s; v.y *= s; v.z *= s; v.w *= s;
            if (!ok) v = make_float4(0.f, 0.f, 0.f, 0.f);
            __half2* d = reinterpret_cast<__half2*>(As + r * GLD + c);
            d[0] = __floats2half2_rn(v.x, v.y); d[1] = __floats2half2_rn(v.z, v.w);
        }
        if constexpr (BLK) {
        // weights, a whole 32-weight block per thread (F::block_h2: a few aligned word loads for the
        // block instead of byte loads per 8-weight part; MXFP4's 17-byte blocks are 1-aligned)
        constexpr int BPW = GBK / F::QK;  // blocks per row in this k-step
        static_assert(GBN * BPW % GEMM_THREADS == 0, "whole block rounds");
#pragma unroll
        for (int it = 0; it < GBN * BPW / GEMM_THREADS; it++) {
            const int i = tid + it * GEMM_THREADS;
            const int r = i / BPW, row = n0 + r, blk = kk / F::QK + i % BPW;
            const bool ok = row < n && blk < nblk;
            uint32_t h[F::QK / 2];  // the block's weights (times its scale) as f16 pairs, in order
            F::block_h2(W + (long long)min(row, n - 1) * RB + (long long)min(blk, nblk - 1) * F::TS, h);
            uint4* d = reinterpret_cast<uint4*>(Bs + r * GLD + blk * F::QK - kk);
#pragma unroll
            for (int j = 0; j < F::QK / 8; j++)
                d[j] = ok ? make_uint4(h[4 * j], h[4 * j + 1], h[4 * j + 2], h[4 * j + 3]) : make_uint4(0, 0, 0, 0);
        }
        } else {
        // weights: 128 rows x 8 parts; part gp = kk/8 + pp covers elements inside this 64-window
#pragma unroll
        for (int it = 0; it < GBN * (GBK / 8) / GEMM_THREADS; it++) {
            const int i = tid + it * GEMM_THREADS;
            const int r = i / (GBK / 8), pp = i % (GBK / 8);
            const int row = n0 + r, gp = kk / 8 + pp;
            const int blk = gp / F::NP, p = gp % F::NP;
            const bool ok = row < n && blk < nblk;
            int o0, o1;
            F::offs(p, o0, o1);
            const int c0 = blk * F::QK + o0 - kk, c1 = blk * F::QK + o1 - kk;
            float q[8], a0, a1, mm0, mm1;
            dec<F>(W + (long long)min(row, n - 1) * RB + (long long)min(blk, nblk - 1) * F::TS, p, q, a0, a1, mm0, mm1);
            float w[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                w[j] = ok ? fmaf(a0, q[j], mm0) : 0.f;
                w[4 + j] = ok ? fmaf(a1, q[4 + j], mm1) : 0.f;
            }
            __half2* d0 = reinterpret_cast<__half2*>(Bs + r * GLD + c0);
            __half2* d1 = reinterpret_cast<__half2*>(Bs + r * GLD + c1);
            d0[0] = __floats2half2_rn(w[0], w[1]); d0[1] = __floats2half2_rn(w[2], w[3]);
            d1[0] = __floats2half2_rn(w[4], w[5]); d1[1] = __floats2half2_rn(w[6], w[7]);
        }
        }
        } else {  // BM > ORCD_GEMM_PIPE: the rolled loops (one load round trip per iteration, fewer registers)
        // activations: BM x 64 floats, scaled per row -> f16; missing rows and columns past k are zero
        for (int i = tid; i < BM * (GBK / 4); i += GEMM_THREADS) {
            const int r = i / (GBK / 4), c = (i % (GBK / 4)) * 4;
            const int xr = xrow[r], col = kk + c;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (xr >= 0 && col < k) {
                v = __ldg(reinterpret_cast<const float4*>(x + (long long)xr * k + col));
                const float s = rscale[r];
                v.x *= s; v.y *= s; v.z *= s; v.w *= s;
            }
            __half2* d = reinterpret_cast<__half2*>(As + r * GLD + c);
            d[0] = __floats2half2_rn(v.x, v.y); d[1] = __floats2half2_rn(v.z, v.w);
        }
        // weights: 128 rows x 8 parts; part gp = kk/8 + pp covers elements inside this 64-window
        for (int i = tid; i < GBN * (GBK / 8); i += GEMM_THREADS) {
            const int r = i / (GBK / 8), pp = i % (GBK / 8);
            const int row = n0 + r, gp = kk / 8 + pp;
            const int blk = gp / F::NP, p = gp % F::NP;
            int o0, o1;
            F::offs(p, o0, o1);
            const int c0 = blk * F::QK + o0 - kk, c1 = blk * F::QK + o1 - kk;
            float q[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a0 = 0.f, a1 = 0.f, mm0 = 0.f, mm1 = 0.f;
            if (row < n && blk < nblk) dec<F>(W + row * RB + (long long)blk * F::TS, p, q, a0, a1, mm0, mm1);
            __half2* d0 = reinterpret_cast<__half2*>(Bs + r * GLD + c0);
            __half2* d1 = reinterpret_cast<__half2*>(Bs + r * GLD + c1);
            d0[0] = __floats2half2_rn(fmaf(a0, q[0], mm0), fmaf(a0, q[1], mm0));
            d0[1] = __floats2half2_rn(fmaf(a0, q[2], mm0), fmaf(a0, q[3], mm0));
            d1[0] = __floats2half2_rn(fmaf(a1, q[4], mm1), fmaf(a1, q[5], mm1));
            d1[1] = __floats2half2_rn(fmaf(a1, q[6], mm1), fmaf(a1, q[7], mm1));
        }
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < GBK; ks += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf;
            wmma::load_matrix_sync(bf, Bs + warp * 16 * GLD + ks, GLD);
#pragma unroll
            for (int i = 0; i < MF; i++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af;
                wmma::load_matrix_sync(af, As + i * 16 * GLD + ks, GLD);
                wmma::mma_sync(acc[i], af, bf, acc[i]);
            }
        }
        __syncthreads();  // tiles are overwritten by the next k-step
    }
    // epilogue: each warp spills one 16x16 fragment at a time to its own scratch and writes it out,
    // undoing the row's activation scale first (each split-K part unscales its own partial sum)
    float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
    const int col = n0 + warp * 16 + (lane & 1) * 8;
#pragma unroll
    for (int i = 0; i < MF; i++) {
        wmma::store_matrix_sync(scratch, acc[i], 16, wmma::mem_row_major);
        __syncwarp();
        const int r = i * 16 + (lane >> 1);
        const int t = yrow[r];
        if (t >= 0) {
            const float inv = rinv[r];
            const float* s = scratch + (lane >> 1) * 16 + (lane & 1) * 8;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int c = col + j;
                if (c < n) {
                    float* yp = y + (long long)t * n + c;
                    const float v = s[j] * inv;
                    if (split) atomicAdd(yp, v);
                    else *yp = v + (bias ? bias[c] : 0.f) + (accumulate ? *yp : 0.f);
                }
            }
        }
        __syncwarp();
    }
}

template <class F>
__device__ __forceinline__ void embed_impl(const int* __restrict__ ids, const uint8_t* __restrict__ W,
                                           float* __restrict__ y, int k) {
    const int t = blockIdx.y, gp = blockIdx.x * blockDim.x + threadIdx.x;
    if (gp >= k / 8) return;
    float w[8];
    int c0, c1;
    part_weights<F>(W + (long long)ids[t] * (k / F::QK) * F::TS, gp, w, c0, c1);
    float* yr = y + (long long)t * k;
    *reinterpret_cast<float4*>(yr + c0) = make_float4(w[0], w[1], w[2], w[3]);
    *reinterpret_cast<float4*>(yr + c1) = make_float4(w[4], w[5], w[6], w[7]);
}

}  // namespace

// x (k floats, k % 32 == 0) -> signed bytes xq and a scale per 32 elements (xd = max|x| / 127), the
// input of the gemv_*_i8 kernels. One warp per block of 32.
extern "C" __global__ void quantize_x8(const float* __restrict__ x, int8_t* __restrict__ xq, float* __restrict__ xd,
                                       int k) { pdl_enter();
    const int blk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (blk * 32 >= k) return;
    q8_store_warp(x[blk * 32 + lane], xq, xd, blk, lane);
}

// y = bias (+ y when accumulating): the starting value for split-K GEMM's atomic partial sums
extern "C" __global__ void gemm_init(float* y, const float* bias, int T, int n, int accumulate) { pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * n) return;
    y[i] = (bias ? bias[i % n] : 0.f) + (accumulate ? y[i] : 0.f);
}

// Groups the T*top_k MoE slots by expert for gemm_moe_* (one block of 1024 threads; E <= 1024; no host
// sync, so it can be graph-captured). Writes the workspace described in moe_group.cuh: per-expert counts
// (shared-memory atomics), their exclusive prefix sums (block scan) -> off; row tiles of BM slots per
// expert -> te/tr (remaining tiles up to Y marked -1); then each slot is placed at its expert's cursor
// -> perm. The order of slots inside one expert depends on atomic order, which changes no result: a
// GEMM row's value does not depend on the other rows of its tile. Slots with an id outside [0, E) are
// dropped (their y rows are not written).
constexpr int MOE_GROUP_THREADS = 1024, MOE_MAX_E = 1024;
extern "C" __global__ void __launch_bounds__(MOE_GROUP_THREADS)
moe_group(const int* __restrict__ ids, int S, int E, int bm, int Y, int* __restrict__ ws) { pdl_enter();
    __shared__ int cur[MOE_MAX_E];
    __shared__ int wc[32], wt[32];
    int* off = ws;
    int* perm = off + E + 1;
    int* te = perm + S;
    int* tr = te + Y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid < E) cur[tid] = 0;
    __syncthreads();
    for (int s = tid; s < S; s += MOE_GROUP_THREADS) {
        const int e = ids[s];
        if (e >= 0 && e < E) atomicAdd(&cur[e], 1);
    }
    __syncthreads();
    const int c = tid < E ? cur[tid] : 0;
    const int nt = (c + bm - 1) / bm;
    int ic = c, it = nt;  // inclusive scans of counts and tile counts over experts 0..tid
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int a = __shfl_up_sync(0xffffffffu, ic, o), b = __shfl_up_sync(0xffffffffu, it, o);
        if (lane >= o) { ic += a; it += b; }
    }
    if (lane == 31) { wc[warp] = ic; wt[warp] = it; }
    __syncthreads();
    if (warp == 0) {
        int a = wc[lane], b = wt[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int a2 = __shfl_up_sync(0xffffffffu, a, o), b2 = __shfl_up_sync(0xffffffffu, b, o);
            if (lane >= o) { a += a2; b += b2; }
        }
        wc[lane] = a; wt[lane] = b;
    }
    __syncthreads();
    const int base = (warp ? wc[warp - 1] : 0) + ic - c;
    const int tbase = (warp ? wt[warp - 1] : 0) + it - nt;
    const int ntiles = wt[31];
    if (tid < E) {
        off[tid] = base;
        cur[tid] = base;  // only this thread read cur[tid] above
        for (int i = 0; i < nt && tbase + i < Y; i++) { te[tbase + i] = tid; tr[tbase + i] = i * bm; }
        if (tid == E - 1) off[E] = base + c;
    }
    for (int t = ntiles + tid; t < Y; t += MOE_GROUP_THREADS) { te[t] = -1; tr[t] = 0; }
    __syncthreads();
    for (int s = tid; s < S; s += MOE_GROUP_THREADS) {
        const int e = ids[s];
        if (e >= 0 && e < E) perm[atomicAdd(&cur[e], 1)] = s;
    }
}

#define GEMV_ARGS const float* x, const uint8_t* W, float* y, const float* bias, const int* expert_ids, int T, int n, int k, \
                  long long expert_stride, int top_k, int x_per_slot, int accumulate
#define GEMV_PASS x, W, y, bias, expert_ids, T, n, k, expert_stride, top_k, x_per_slot, accumulate
#define GEMM_ARGS const float* x, const uint8_t* W, float* y, const float* bias, int T, int n, int k, int accumulate, int kchunk

#define GEMM_MOE_ARGS const float* x, const uint8_t* W, float* y, const float* bias, const int* ws, int T, int top_k, int E, \
                      int Y, int n, int k, long long expert_stride, int x_per_slot
#define GEMM_MOE(name, F, BM)                                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_moe_##name##_##BM(GEMM_MOE_ARGS) { pdl_enter(); \
        gemm_impl<F, BM>(x, W, y, bias, T, n, k, 0, k, MoeGroup{ws, top_k, E, Y, x_per_slot, expert_stride});       \
    }
// MXFP4 tiles of BM <= 64 decode whole blocks (BLK); its per-part tiles of those sizes measured slower
#define GEMM_MOE_BLK(name, F, BM)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_moe_##name##_##BM##_blk(GEMM_MOE_ARGS) { pdl_enter(); \
        gemm_impl<F, BM, true>(x, W, y, bias, T, n, k, 0, k, MoeGroup{ws, top_k, E, Y, x_per_slot, expert_stride});  \
    }

#define GEMV(name, F, NT)                                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##name##_##NT(GEMV_ARGS) { gemv_impl<F, NT, 1>(GEMV_PASS); } \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##name##_##NT##_k4(GEMV_ARGS) { \
        gemv_impl<F, NT, GEMV_WARPS>(GEMV_PASS);                                                                 \
    }
// GEMVs of up to 8 tokens on an int8-quantized input (quantize_x8 or a *_q8 producer): xd holds the
// input's block scales, k / 32 per token row
#define GEMV_I8_NT(name, F, NT)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##name##_##NT##_i8(GEMV_ARGS, const float* xd) { \
        gemv_impl<F, NT, 1, ACT_I8>(GEMV_PASS, xd);                                                              \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##name##_##NT##_k4_i8(GEMV_ARGS, const float* xd) { \
        gemv_impl<F, NT, GEMV_WARPS, ACT_I8>(GEMV_PASS, xd);                                                     \
    }
// The per-slot MoE GEMV of two matrices on one input (gate and up: W2, bias2), one launch for both (PAIR)
#define GEMV_I8_PAIR(name, F)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##name##_1_i8_pair(GEMV_ARGS, const float* xd, \
                                                                                        const uint8_t* W2, const float* bias2) { \
        gemv_impl<F, 1, 1, ACT_I8, true>(GEMV_PASS, xd, W2, bias2);                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##name##_1_k4_i8_pair(GEMV_ARGS, const float* xd, \
                                                                                           const uint8_t* W2, const float* bias2) { \
        gemv_impl<F, 1, GEMV_WARPS, ACT_I8, true>(GEMV_PASS, xd, W2, bias2);                                            \
    }
#define GEMV_I8(name, F) GEMV_I8_NT(name, F, 1) GEMV_I8_NT(name, F, 2) GEMV_I8_NT(name, F, 4) GEMV_I8_NT(name, F, 8) \
    GEMV_I8_PAIR(name, F)
// Dense GEMM tiles stop at BM 64 (cuda_quant.GEMM_MAX_BM); the grouped MoE GEMM also has BM 128. The BM
// 16..64 MoE tiles are per format (MOE_TILES) because MXFP4 takes the BLK ones at those sizes.
#define MOE_TILES(name, F) GEMM_MOE(name, F, 16) GEMM_MOE(name, F, 32) GEMM_MOE(name, F, 64)
#define DEFINE_FORMAT(name, F)                                                                                   \
    GEMV(name, F, 1) GEMV(name, F, 2) GEMV(name, F, 4) GEMV(name, F, 8)                                          \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_##name##_16(GEMM_ARGS) { pdl_enter(); gemm_impl<F, 16>(x, W, y, bias, T, n, k, accumulate, kchunk, MoeGroup{}); } \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_##name##_32(GEMM_ARGS) { pdl_enter(); gemm_impl<F, 32>(x, W, y, bias, T, n, k, accumulate, kchunk, MoeGroup{}); } \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_##name##_64(GEMM_ARGS) { pdl_enter(); gemm_impl<F, 64>(x, W, y, bias, T, n, k, accumulate, kchunk, MoeGroup{}); } \
    extern "C" __global__ void embed_##name(const int* ids, const uint8_t* W, float* y, int k) { pdl_enter(); embed_impl<F>(ids, W, y, k); } \
    GEMM_MOE(name, F, 128)

DEFINE_FORMAT(q4_0, FQ4_0) MOE_TILES(q4_0, FQ4_0)
DEFINE_FORMAT(q4_1, FQ4_1) MOE_TILES(q4_1, FQ4_1)
DEFINE_FORMAT(q5_0, FQ5_0) MOE_TILES(q5_0, FQ5_0)
DEFINE_FORMAT(q5_1, FQ5_1) MOE_TILES(q5_1, FQ5_1)
DEFINE_FORMAT(q8_0, FQ8_0) MOE_TILES(q8_0, FQ8_0)
DEFINE_FORMAT(mxfp4, FMXFP4)
DEFINE_FORMAT(q4_k, FQ4_K) MOE_TILES(q4_k, FQ4_K)
DEFINE_FORMAT(q5_k, FQ5_K) MOE_TILES(q5_k, FQ5_K)
DEFINE_FORMAT(q6_k, FQ6_K) MOE_TILES(q6_k, FQ6_K)
GEMV_I8(q4_0, FQ4_0)
GEMV_I8(q4_1, FQ4_1)
GEMV_I8(q5_0, FQ5_0)
GEMV_I8(q5_1, FQ5_1)
GEMV_I8(q8_0, FQ8_0)
GEMV_I8(mxfp4, FMXFP4)
GEMM_MOE_BLK(mxfp4, FMXFP4, 16) GEMM_MOE_BLK(mxfp4, FMXFP4, 32) GEMM_MOE_BLK(mxfp4, FMXFP4, 64)
GEMV_I8(q4_k, FQ4_K)
GEMV_I8(q5_k, FQ5_K)
GEMV_I8(q6_k, FQ6_K)
DEFINE_FORMAT(f32, FF32) MOE_TILES(f32, FF32)
DEFINE_FORMAT(f16, FF16) MOE_TILES(f16, FF16)
DEFINE_FORMAT(bf16, FBF16) MOE_TILES(bf16, FBF16)
