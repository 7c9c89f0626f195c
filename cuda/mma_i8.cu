// gemm_i8_<fmt>_<bm>: y[T, n] = W x on int8 tensor cores, for matmuls of 9..64 tokens.
//
// The input comes rounded to int8 a 32-block (quantize_x8 or a *_q8 producer: xq [T][k] levels,
// xd [T][k/32] scales), as the int8 GEMVs take it. The weights stay in their GGUF blocks: each
// stage of 256 k-elements copies the raw row bytes of a 128-row tile into shared memory (cp.async,
// two stages in flight), and each warp builds its mma.sync A fragments from those bytes directly
// (a format's qi: the integer levels, 4 to a word), so a weight byte is read from VRAM once per
// BM tokens and is never widened to f16. Per 32-element block (16 for Q6_K, whose scales are per
// 16) one m16n8k32 (m16n8k16) product gives exact int32 sums, which the block's two scales (the
// weight's a, the input's xd) turn into the float accumulators; formats with an offset term
// (Q4_1, Q5_1, Q4_K, Q5_K: w = a q + m) add m times the input block's float sum.
//
// The k order inside a 32-block is the format's: thread t of a quad holds the elements of its
// parts' o0 / o1 words in both fragments (A and B use the same permutation, so the sums are the
// plain dot products).
//
// Shared memory (dynamic, per stage s of ISTAGES):
//   Wraw[s]  [IBN][RSTR] bytes    the tile's raw row bytes of the stage, each row from its 16-byte
//                                  aligned start (the row's offset into it is row_addr & 15)
//   Xq[s]    [BM][XSTR] int8      the input levels of the stage's 256 k
//   Xd[s]    [8][BM] float        their scales, a 32-block each
//   Xs       [8][BM] float        xd times the block's level sum (offset-term formats), this stage
#include "common.cuh"
#include "moe_group.cuh"
#include "quant_common.cuh"

using namespace oq;

#ifndef ORCD_GEMM_I8_UNROLL
#define ORCD_GEMM_I8_UNROLL 0
#endif

namespace {

constexpr int IBN = 128, IKS = 256, ITHREADS = 256, ISTAGES = 2;

// Q6_K's scales are per 16 elements, the other formats' per 32.
template <class F> struct SubOf { static constexpr int v = F::QK == 256 && !F::MIN ? 16 : 32; };

// A 32-weight format's bytes in shared memory, read a word at a time at the format's alignment.
template <class F>
struct Raw {
    static constexpr int AL = F::TS % 4 == 0 ? 4 : F::TS % 2 == 0 ? 2 : 1;
    const uint8_t* p;
    __device__ __forceinline__ uint32_t at(int o) const { return ld32<AL>(p + o); }
    __device__ __forceinline__ float h(int o) const { return ldh(p + o); }
    __device__ __forceinline__ uint32_t b(int o) const { return p[o]; }
};

template <class F>
struct StageShape {
    static constexpr int CH = IKS / F::QK * F::TS;           // raw bytes of a row per full stage
    static constexpr int NPC = (CH + 30) / 16;                // 16-byte pieces covering it from any alignment
    static constexpr int RSTR = NPC * 16 + 16;                // row stride (the +16 staggers rows over banks)
};

// d = a b + (I2F_BIAS, ..): the accumulator starts at i2f's bias, so each block sum comes out ready
// for it (one register set holds the constant for every product, where a zero start cost an add a sum).
constexpr int I2F_BIAS = 0x4B400000;
__device__ __forceinline__ void mma_k32(int* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %10, %10, %10};\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(I2F_BIAS));
}
__device__ __forceinline__ void mma_k16(int* d, uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%7, %7, %7, %7};\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(I2F_BIAS));
}

// A block sum (at most 32 * 128 * 128 = 2^19 in magnitude) that an mma added to I2F_BIAS, as a float:
// 1.5 * 2^23 + i holds i in its low mantissa bits, so one float add instead of the quarter-rate I2F.
__device__ __forceinline__ float i2f(int biased) { return __int_as_float(biased) - 12582912.0f; }

// The levels of one 64-element window (two 32-blocks, "slots" h = 0, 1) of weight row `rowp` (a
// pointer to the row's stage bytes) as thread t's A-fragment words: w[h][0] for k 4t..4t+3 of the
// slot's mma, w[h][1] for k 16+4t..; signed. a_lo[h] scales the first 16 of the slot's k, a_hi[h]
// the rest (they differ for Q6_K only); m[h] is the offset term; e[h][0 / 1]: the stage columns
// those words hold, where the input's words come from.
struct Window {
    uint32_t w[2][2];
    float a_lo[2], a_hi[2], m[2];
    int e[2][2];
};

template <class F>
__device__ __forceinline__ Window window_a(const uint8_t* rowp, int wdx, int t) {
    Window v;
    if constexpr (F::QK == 256) {
        // window c = wdx: parts 8c + t and 8c + 4 + t hold elements 4t.. and 16 + 4t.. of its low
        // 32-block (their lo words) and of its high one (hi words)
        const int p0 = 8 * wdx + t, p1 = p0 + 4;
        F::qi(rowp, p0, v.w[0][0], v.w[1][0]);
        F::qi(rowp, p1, v.w[0][1], v.w[1][1]);
        F::sc(rowp, p0, v.a_lo[0], v.a_lo[1], v.m[0], v.m[1]);
        if constexpr (SubOf<F>::v == 16) {
            float n0, n1;
            F::sc(rowp, p1, v.a_hi[0], v.a_hi[1], n0, n1);
        } else {
            v.a_hi[0] = v.a_lo[0];
            v.a_hi[1] = v.a_lo[1];
        }
        F::offs(p0, v.e[0][0], v.e[1][0]);
        F::offs(p1, v.e[0][1], v.e[1][1]);
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // one block a slot; its part t holds elements o0(t).. and o1(t)..
            const int blk = 2 * wdx + h;
            const Raw<F> r{rowp + blk * F::TS};
            F::qi_at(r, t, v.w[h][0], v.w[h][1]);
            float a1, m1;
            F::sc_at(r, v.a_lo[h], a1, v.m[h], m1);
            v.a_hi[h] = v.a_lo[h];
            int o0, o1;
            F::offs(t, o0, o1);
            v.e[h][0] = 32 * blk + o0;
            v.e[h][1] = 32 * blk + o1;
        }
    }
    if constexpr (F::QB != 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            v.w[h][0] = __vsub4(v.w[h][0], F::QB * 0x01010101u);
            v.w[h][1] = __vsub4(v.w[h][1], F::QB * 0x01010101u);
        }
    }
    return v;
}

template <class F, int BM, bool MOE>
__device__ __forceinline__ void gemm_i8_impl(const int8_t* __restrict__ xq, const float* __restrict__ xd,
                                             const uint8_t* __restrict__ W, float* __restrict__ y,
                                             const float* __restrict__ bias, int T, int n, int k, int accumulate,
                                             int kchunk, const MoeGroup mg) {
    using S = StageShape<F>;
    constexpr int XSTR = IKS + 16, NF = BM / 8, SUB = SubOf<F>::v;  // XSTR: a token row's levels, staggered
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t* Wraw = smem;                                                   // [ISTAGES][IBN][RSTR]
    int8_t* Xq = reinterpret_cast<int8_t*>(Wraw + ISTAGES * IBN * S::RSTR);  // [ISTAGES][BM][XSTR]
    float* Xd = reinterpret_cast<float*>(Xq + ISTAGES * BM * XSTR);          // [ISTAGES][8][BM]
    float* Xs = Xd + ISTAGES * 8 * BM;                                      // [8][BM]

    __shared__ int xrow[MOE ? BM : 1], yrow[MOE ? BM : 1];  // a tile row's input and output row (-1: none)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * IBN, t0 = blockIdx.y * BM;
    if constexpr (MOE) {  // gemm_i8_moe_*: blockIdx.y is a row tile of one expert's slots
        if (!moe_tile<BM, ITHREADS>(mg, T, n, W, bias, xrow, yrow)) return;
        __syncthreads();
    }
    const int kbeg = blockIdx.z * kchunk, kend = min(k, kbeg + kchunk);
    const long long RB = (long long)(k / F::QK) * F::TS;
    const int nstage = (kend - kbeg + IKS - 1) / IKS;

    auto issue = [&](int st) {  // the copies of stage st into buffer st % ISTAGES (one commit group)
        if (st < nstage) {
            const int buf = st % ISTAGES, kk = kbeg + st * IKS, nk = min(IKS, kend - kk);
            const int ch = nk / F::QK * F::TS;
            uint8_t* wb = Wraw + buf * IBN * S::RSTR;
            for (int i = tid; i < IBN * S::NPC; i += ITHREADS) {
                const int r = i / S::NPC, pc = i % S::NPC;
                const uint8_t* src = W + (long long)min(n0 + r, n - 1) * RB + (long long)(kk / F::QK) * F::TS;
                const int off = static_cast<int>(reinterpret_cast<uintptr_t>(src) & 15);
                if (pc * 16 < off + ch) cp_async16(wb + r * S::RSTR + pc * 16, src - off + pc * 16);
            }
            int8_t* xb = Xq + buf * BM * XSTR;
            for (int i = tid; i < BM * (IKS / 16); i += ITHREADS) {
                const int r = i / (IKS / 16), pc = i % (IKS / 16);
                if constexpr (MOE) {
                    const int xr = xrow[r];
                    if (xr >= 0 && pc * 16 < nk) cp_async16(xb + r * XSTR + pc * 16, xq + (long long)xr * k + kk + pc * 16);
                } else {
                    if (t0 + r < T && pc * 16 < nk) cp_async16(xb + r * XSTR + pc * 16, xq + (long long)(t0 + r) * k + kk + pc * 16);
                }
            }
            float* db = Xd + buf * 8 * BM;
            for (int i = tid; i < 8 * BM; i += ITHREADS) {
                const int s = i / BM, r = i % BM;
                if constexpr (MOE) {
                    const int xr = xrow[r];
                    if (xr >= 0 && s * 32 < nk) cp_async4(db + s * BM + r, xd + (long long)xr * (k / 32) + kk / 32 + s);
                    else db[s * BM + r] = 0.f;
                } else {
                    if (t0 + r < T && s * 32 < nk) cp_async4(db + s * BM + r, xd + (long long)(t0 + r) * (k / 32) + kk / 32 + s);
                    else db[s * BM + r] = 0.f;
                }
            }
        }
        cp_async_commit();
    };

    float acc[NF][4];
#pragma unroll
    for (int j = 0; j < NF; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    const int r0 = 16 * warp + g;  // this thread's weight rows in the tile: r0 and r0 + 8
#pragma unroll 1
    for (int st = 0; st < ISTAGES - 1; ++st) issue(st);
#pragma unroll 1
    for (int st = 0; st < nstage; ++st) {
        issue(st + ISTAGES - 1);
        cp_async_wait1();
        __syncthreads();
        const int buf = st % ISTAGES, kk = kbeg + st * IKS, nk = min(IKS, kend - kk);
        const uint8_t* wb = Wraw + buf * IBN * S::RSTR;
        const int8_t* xb = Xq + buf * BM * XSTR;
        const float* db = Xd + buf * 8 * BM;
        if constexpr (F::MIN) {  // xd times each input block's level sum
            for (int i = tid; i < 8 * BM; i += ITHREADS) {
                const int s = i / BM, r = i % BM;
                float v = 0.f;
                if (s * 32 < nk) {
                    const int4* p = reinterpret_cast<const int4*>(xb + r * XSTR + 32 * s);
                    const int4 u = p[0], w = p[1];
                    int sum = __dp4a(u.x, 0x01010101, 0);
                    sum = __dp4a(u.y, 0x01010101, sum); sum = __dp4a(u.z, 0x01010101, sum);
                    sum = __dp4a(u.w, 0x01010101, sum); sum = __dp4a(w.x, 0x01010101, sum);
                    sum = __dp4a(w.y, 0x01010101, sum); sum = __dp4a(w.z, 0x01010101, sum);
                    sum = __dp4a(w.w, 0x01010101, sum);
                    v = db[s * BM + r] * static_cast<float>(sum);
                }
                Xs[s * BM + r] = v;
            }
            __syncthreads();
        }
        const uint8_t* row0 = wb + r0 * S::RSTR;
        const uint8_t* row1 = row0 + 8 * S::RSTR;
        const long long ga = (long long)min(n0 + r0, n - 1) * RB + (long long)(kk / F::QK) * F::TS;
        const long long gb = (long long)min(n0 + r0 + 8, n - 1) * RB + (long long)(kk / F::QK) * F::TS;
        row0 += static_cast<int>(reinterpret_cast<uintptr_t>(W + ga) & 15);
        row1 += static_cast<int>(reinterpret_cast<uintptr_t>(W + gb) & 15);
        const int nslot = nk / 32;
#if ORCD_GEMM_I8_UNROLL  // a window's scale and byte offsets fold to constants (2 blocks an SM at BM 32, not 3)
#pragma unroll
#else
#pragma unroll 1
#endif
        for (int wdx = 0; wdx < IKS / 64; ++wdx) {
            if (2 * wdx >= nslot) break;
            const Window u = window_a<F>(row0, wdx, t), v = window_a<F>(row1, wdx, t);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int slot = 2 * wdx + h;
                if (slot >= nslot) break;
                const uint32_t a[4] = {u.w[h][0], v.w[h][0], u.w[h][1], v.w[h][1]};
                const int e0 = u.e[h][0], e1 = u.e[h][1];
#pragma unroll
                for (int j = 0; j < NF; ++j) {
                    const int8_t* xr = xb + (8 * j + g) * XSTR;
                    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(xr + e0);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(xr + e1);
                    const float2 d = *reinterpret_cast<const float2*>(db + slot * BM + 8 * j + 2 * t);
                    if constexpr (SUB == 32) {
                        int c[4];
                        mma_k32(c, a, b0, b1);
                        acc[j][0] = fmaf(u.a_lo[h] * d.x, i2f(c[0]), acc[j][0]);
                        acc[j][1] = fmaf(u.a_lo[h] * d.y, i2f(c[1]), acc[j][1]);
                        acc[j][2] = fmaf(v.a_lo[h] * d.x, i2f(c[2]), acc[j][2]);
                        acc[j][3] = fmaf(v.a_lo[h] * d.y, i2f(c[3]), acc[j][3]);
                    } else {
                        int c[4], e[4];
                        mma_k16(c, a[0], a[1], b0);
                        mma_k16(e, a[2], a[3], b1);
                        acc[j][0] = fmaf(d.x, fmaf(u.a_lo[h], i2f(c[0]), u.a_hi[h] * i2f(e[0])), acc[j][0]);
                        acc[j][1] = fmaf(d.y, fmaf(u.a_lo[h], i2f(c[1]), u.a_hi[h] * i2f(e[1])), acc[j][1]);
                        acc[j][2] = fmaf(d.x, fmaf(v.a_lo[h], i2f(c[2]), v.a_hi[h] * i2f(e[2])), acc[j][2]);
                        acc[j][3] = fmaf(d.y, fmaf(v.a_lo[h], i2f(c[3]), v.a_hi[h] * i2f(e[3])), acc[j][3]);
                    }
                    if constexpr (F::MIN) {
                        const float2 sm = *reinterpret_cast<const float2*>(Xs + slot * BM + 8 * j + 2 * t);
                        acc[j][0] = fmaf(u.m[h], sm.x, acc[j][0]);
                        acc[j][1] = fmaf(u.m[h], sm.y, acc[j][1]);
                        acc[j][2] = fmaf(v.m[h], sm.x, acc[j][2]);
                        acc[j][3] = fmaf(v.m[h], sm.y, acc[j][3]);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this buffer (and Xs) before the next copies land
    }
    cp_async_wait0();

    // c0, c1: row r0, tokens 2t, 2t+1 of the fragment; c2, c3: row r0 + 8
    const bool split = gridDim.z > 1;
#pragma unroll
    for (int j = 0; j < NF; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = n0 + r0 + 8 * (e >> 1);
            float* yp;
            if constexpr (MOE) {
                const int yr = yrow[8 * j + 2 * t + (e & 1)];
                if (row >= n || yr < 0) continue;
                yp = y + (long long)yr * n + row;
            } else {
                const int tok = t0 + 8 * j + 2 * t + (e & 1);
                if (row >= n || tok >= T) continue;
                yp = y + (long long)tok * n + row;
            }
            if (split) {
                atomicAdd(yp, acc[j][e]);
            } else {
                float v = acc[j][e];
                if (bias) v += bias[row];
                if (accumulate) v += *yp;
                *yp = v;
            }
        }
    }
}

}  // namespace

// Dynamic shared memory of a tile (cuda_quant.gemm_i8_smem computes the same).
#define GEMM_I8_ARGS const int8_t* xq, const float* xd, const uint8_t* W, float* y, const float* bias, int T, int n, \
                     int k, int accumulate, int kchunk
#define GEMM_I8_MOE_ARGS const int8_t* xq, const float* xd, const uint8_t* W, float* y, const float* bias, const int* ws, \
                         int T, int top_k, int E, int Y, int n, int k, long long expert_stride, int x_per_slot
#define GEMM_I8(name, F, BM)                                                                                      \
    extern "C" __global__ void __launch_bounds__(ITHREADS) gemm_i8_##name##_##BM(GEMM_I8_ARGS) {                 \
        pdl_enter();                                                                                              \
        gemm_i8_impl<F, BM, false>(xq, xd, W, y, bias, T, n, k, accumulate, kchunk, MoeGroup{});                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(ITHREADS) gemm_i8_moe_##name##_##BM(GEMM_I8_MOE_ARGS) {         \
        pdl_enter();                                                                                              \
        gemm_i8_impl<F, BM, true>(xq, xd, W, y, bias, T, n, k, 0, k, MoeGroup{ws, top_k, E, Y, x_per_slot, expert_stride}); \
    }
#define GEMM_I8_FORMAT(name, F) GEMM_I8(name, F, 16) GEMM_I8(name, F, 32) GEMM_I8(name, F, 64)

GEMM_I8_FORMAT(q4_0, FQ4_0)
GEMM_I8_FORMAT(q4_1, FQ4_1)
GEMM_I8_FORMAT(q5_0, FQ5_0)
GEMM_I8_FORMAT(q5_1, FQ5_1)
GEMM_I8_FORMAT(q8_0, FQ8_0)
GEMM_I8_FORMAT(mxfp4, FMXFP4)
GEMM_I8_FORMAT(q4_k, FQ4_K)
GEMM_I8_FORMAT(q5_k, FQ5_K)
GEMM_I8_FORMAT(q6_k, FQ6_K)
