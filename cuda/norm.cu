// RMSNorm, optionally fused with the residual add that precedes it in a pre-norm block.
//
//   s = x (+ res);  out = s / sqrt(mean(s^2) + eps) * w
//
// One launch normalises `rows` rows of length d: the [T, d] hidden states, or the [T*H, d]
// per-head rows of a Q/K norm (w then has length d and is shared by all heads). Short rows
// (d <= 1024, e.g. per-head norms) get one warp each so a block does several; long rows get a
// whole block so that a decode step with T=1 still spreads its row over many threads.
#include "common.cuh"

template <bool VEC>
__device__ __forceinline__ float load_sum_sq(const float* __restrict__ x, const float* __restrict__ res,
                                             float* __restrict__ s_out, int d, int i0, int stride) {
    float ss = 0.f;
    if (VEC) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const float4* r4 = reinterpret_cast<const float4*>(res);
        float4* s4 = reinterpret_cast<float4*>(s_out);
        for (int i = i0; i < d / 4; i += stride) {
            float4 v = x4[i];
            if (res) {
                float4 r = r4[i];
                v.x += r.x; v.y += r.y; v.z += r.z; v.w += r.w;
                s4[i] = v;
            }
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = i0; i < d; i += stride) {
            float v = x[i];
            if (res) { v += res[i]; s_out[i] = v; }
            ss += v * v;
        }
    }
    return ss;
}

// Q8: out's 4 elements at float4 index i also go to xq as int8, with xd[i / 8] the scale of their
// 32-element block (q8_round). Lanes 8g..8g+7 of a warp hold one block when the float4 index runs
// lane-contiguous with a stride that is a multiple of 32 and d % 32 == 0 (so a group is in or out of
// the loop as a whole).
__device__ __forceinline__ void q8_store4(float4 o, int8_t* __restrict__ xq, float* __restrict__ xd, int i) {
    const unsigned group = 0xffu << (threadIdx.x & 24);
    float m = fmaxf(fmaxf(fabsf(o.x), fabsf(o.y)), fmaxf(fabsf(o.z), fabsf(o.w)));
    m = fmaxf(m, __shfl_xor_sync(group, m, 1));
    m = fmaxf(m, __shfl_xor_sync(group, m, 2));
    m = fmaxf(m, __shfl_xor_sync(group, m, 4));
    const float dq = m / 127.f;
    reinterpret_cast<char4*>(xq)[i] = make_char4(q8_round(o.x, dq, m), q8_round(o.y, dq, m), q8_round(o.z, dq, m),
                                                 q8_round(o.w, dq, m));
    if ((i & 7) == 0) xd[i >> 3] = dq;
}

template <bool VEC, bool Q8 = false>
__device__ __forceinline__ void scale_out(const float* __restrict__ s, const float* __restrict__ w,
                                          float* __restrict__ out, int d, float inv, int i0, int stride,
                                          int8_t* __restrict__ xq = nullptr, float* __restrict__ xd = nullptr) {
    static_assert(VEC || !Q8, "the int8 copy is written from float4s");
    if (VEC) {
        const float4* s4 = reinterpret_cast<const float4*>(s);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (int i = i0; i < d / 4; i += stride) {
            float4 v = s4[i], g = w4[i];
            const float4 o = make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w);
            o4[i] = o;
            if constexpr (Q8) q8_store4(o, xq, xd, i);
        }
    } else {
        for (int i = i0; i < d; i += stride) out[i] = s[i] * inv * w[i];
    }
}

// One warp per row; blockDim.x = 32 * rows_per_block.
template <bool VEC>
__device__ void rms_norm_warp_impl(const float* x, const float* res, float* s_out, float* out,
                                   const float* w, int rows, int d, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t off = (size_t)row * d;
    float ss = warp_sum(load_sum_sq<VEC>(x + off, res ? res + off : nullptr, s_out + off, d, lane, 32));
    const float inv = rsqrtf(ss / d + eps);
    __syncwarp();  // s_out written by other lanes is read back below
    scale_out<VEC>(res ? s_out + off : x + off, w, out + off, d, inv, lane, 32);
}

// A block's row held in registers (up to NORM_REGS float4 a thread): the products read back what this
// thread loaded instead of a second trip through memory for s, and no barrier separates the two passes
// (each thread scales only its own values). Rows longer than that take the two-pass path below.
constexpr int NORM_REGS = 4;
template <bool Q8>
__device__ __forceinline__ void rms_norm_row_regs(const float* __restrict__ x, const float* __restrict__ res,
                                                  float* __restrict__ s_out, float* __restrict__ out,
                                                  const float* __restrict__ w, int d, float eps, float* scratch,
                                                  int8_t* __restrict__ xq, float* __restrict__ xd) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const float4* r4 = reinterpret_cast<const float4*>(res);
    float4 v[NORM_REGS];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < d / 4) {
            v[j] = x4[i];
            if (res) {
                const float4 r = r4[i];
                v[j].x += r.x; v[j].y += r.y; v[j].z += r.z; v[j].w += r.w;
                reinterpret_cast<float4*>(s_out)[i] = v[j];
            }
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
    for (int j = 0; j < NORM_REGS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < d / 4) {  // d % 32 == 0 for Q8: a group of 8 lanes is in or out as a whole (q8_store4)
            const float4 g = w4[i];
            const float4 o = make_float4(v[j].x * inv * g.x, v[j].y * inv * g.y, v[j].z * inv * g.z, v[j].w * inv * g.w);
            reinterpret_cast<float4*>(out)[i] = o;
            if constexpr (Q8) q8_store4(o, xq, xd, i);
        }
    }
}

template <bool VEC, bool Q8 = false>
__device__ void rms_norm_block_impl(const float* x, const float* res, float* s_out, float* out,
                                    const float* w, int d, float eps, int8_t* xq = nullptr, float* xd = nullptr) {
    __shared__ float scratch[32];
    const size_t off = (size_t)blockIdx.x * d;
    if constexpr (VEC) {
        if (d / 4 <= NORM_REGS * (int)blockDim.x) {  // the usual case: the row stays in registers
            rms_norm_row_regs<Q8>(x + off, res ? res + off : nullptr, s_out + off, out + off, w, d, eps, scratch,
                                  Q8 ? xq + off : nullptr, Q8 ? xd + off / 32 : nullptr);
            return;
        }
    }
    float ss = block_sum(load_sum_sq<VEC>(x + off, res ? res + off : nullptr, s_out + off, d, threadIdx.x,
                                          blockDim.x), scratch);
    const float inv = rsqrtf(ss / d + eps);
    __syncthreads();
    scale_out<VEC, Q8>(res ? s_out + off : x + off, w, out + off, d, inv, threadIdx.x, blockDim.x,
                       Q8 ? xq + off : nullptr, Q8 ? xd + off / 32 : nullptr);
}

// res may be null (plain norm; s_out unused). vec: d % 4 == 0 and 16-byte aligned pointers.
extern "C" __global__ void rms_norm_warp(const float* __restrict__ x, const float* __restrict__ res,
                                         float* __restrict__ s_out, float* __restrict__ out,
                                         const float* __restrict__ w, int rows, int d, float eps, int vec) { pdl_enter();
    if (vec) rms_norm_warp_impl<true>(x, res, s_out, out, w, rows, d, eps);
    else rms_norm_warp_impl<false>(x, res, s_out, out, w, rows, d, eps);
}

extern "C" __global__ void rms_norm_block(const float* __restrict__ x, const float* __restrict__ res,
                                          float* __restrict__ s_out, float* __restrict__ out,
                                          const float* __restrict__ w, int rows, int d, float eps, int vec) { pdl_enter();
    if (vec) rms_norm_block_impl<true>(x, res, s_out, out, w, d, eps);
    else rms_norm_block_impl<false>(x, res, s_out, out, w, d, eps);
}

// rms_norm_block that also writes its output rounded to int8 (xq, d bytes per row) with a scale per
// 32 elements (xd), for the int8 GEMV that follows (ORCD_FUSE_Q8): one quantize launch
// less per such matmul. d % 32 == 0, 16-byte aligned rows, blockDim.x a multiple of 32.
extern "C" __global__ void rms_norm_block_q8(const float* __restrict__ x, const float* __restrict__ res,
                                             float* __restrict__ s_out, float* __restrict__ out,
                                             const float* __restrict__ w, int rows, int d, float eps,
                                             int8_t* __restrict__ xq, float* __restrict__ xd) { pdl_enter();
    rms_norm_block_impl<true, true>(x, res, s_out, out, w, d, eps, xq, xd);
}
