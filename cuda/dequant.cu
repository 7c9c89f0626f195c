// The operands of the cuBLAS path for large dense matmuls (orcd_grpc/backends/cuda_blas.py):
//   absmax_rows      the largest finite |x| of a [T, k] float32 activation matrix, as float bits in *gmax
//                    (non-negative floats order like unsigned ints, so atomicMax orders them; the
//                    caller zeroes *gmax first). One block per row.
//   to_half_scaled   x * s rounded to f16, s the power of two that brings *gmax into [2^14, 2^15)
//                    (pow2_scale): one scale for the whole matrix, so it can be undone by cuBLAS's
//                    alpha (*alpha = 1/s, read on the device) with no epilogue pass over the output.
//                    Rows far below the largest keep full f16 precision down to 2^-29 of it.
//   dequant_h_<fmt>  rows [0, rows) of a GGUF weight (W points at the first) decoded to f16 [rows, k];
//                    one thread per 8-weight part (part_weights, as embed_<fmt>).
//   add_bias_rows    y[t, c] += bias[c]
// Kernels never allocate, copy to the host or synchronise, so launches can be captured in a graph.
#include "common.cuh"
#include "quant_common.cuh"

using namespace oq;

// |v|, or 0 for Inf and NaN: a row that overflowed sets no scale for the rest of the matrix (fmaxf
// already skips NaN; an Inf would leave s = 1, and finite rows past f16's range would overflow).
__device__ __forceinline__ float finite_abs(float v) { return fabsf(v) <= 3.402823466e38f ? fabsf(v) : 0.f; }

extern "C" __global__ void absmax_rows(const float* __restrict__ x, int k, unsigned* __restrict__ gmax) { pdl_enter();
    const float4* xr = reinterpret_cast<const float4*>(x + (long long)blockIdx.x * k);
    float mx = 0.f;
    for (int c = threadIdx.x; c < k / 4; c += blockDim.x) {
        const float4 v = __ldg(xr + c);
        mx = fmaxf(mx, fmaxf(fmaxf(finite_abs(v.x), finite_abs(v.y)), fmaxf(finite_abs(v.z), finite_abs(v.w))));
    }
    __shared__ float scratch[32];
    mx = block_max(mx, scratch);
    if (threadIdx.x == 0) atomicMax(gmax, __float_as_uint(mx));
}

extern "C" __global__ void to_half_scaled(const float* __restrict__ x, __half* __restrict__ xh, long long n4,
                                          const unsigned* __restrict__ gmax, float* __restrict__ alpha) { pdl_enter();
    float s, inv;
    pow2_scale(__uint_as_float(*gmax), s, inv);
    if (blockIdx.x == 0 && threadIdx.x == 0) *alpha = inv;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    uint2* h4 = reinterpret_cast<uint2*>(xh);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
        const float4 v = __ldg(x4 + i);
        const __half2 a = __floats2half2_rn(v.x * s, v.y * s), b = __floats2half2_rn(v.z * s, v.w * s);
        h4[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
    }
}

template <class F>
__device__ __forceinline__ void dequant_h_impl(const uint8_t* __restrict__ W, __half* __restrict__ wh, int k) {
    const int r = blockIdx.y, gp = blockIdx.x * blockDim.x + threadIdx.x;
    if (gp >= k / 8) return;
    float w[8];
    int c0, c1;
    part_weights<F>(W + (long long)r * (k / F::QK) * F::TS, gp, w, c0, c1);
    __half* hr = wh + (long long)r * k;
    const __half2 h0 = __floats2half2_rn(w[0], w[1]), h1 = __floats2half2_rn(w[2], w[3]);
    const __half2 h2 = __floats2half2_rn(w[4], w[5]), h3 = __floats2half2_rn(w[6], w[7]);
    *reinterpret_cast<uint2*>(hr + c0) = make_uint2(*reinterpret_cast<const uint32_t*>(&h0), *reinterpret_cast<const uint32_t*>(&h1));
    *reinterpret_cast<uint2*>(hr + c1) = make_uint2(*reinterpret_cast<const uint32_t*>(&h2), *reinterpret_cast<const uint32_t*>(&h3));
}

#define DEQUANT(name, F) \
    extern "C" __global__ void dequant_h_##name(const uint8_t* W, __half* wh, int k) { pdl_enter(); dequant_h_impl<F>(W, wh, k); }

DEQUANT(q4_0, FQ4_0)
DEQUANT(q4_1, FQ4_1)
DEQUANT(q5_0, FQ5_0)
DEQUANT(q5_1, FQ5_1)
DEQUANT(q8_0, FQ8_0)
DEQUANT(mxfp4, FMXFP4)
DEQUANT(q4_k, FQ4_K)
DEQUANT(q5_k, FQ5_K)
DEQUANT(q6_k, FQ6_K)
DEQUANT(f32, FF32)
DEQUANT(f16, FF16)
DEQUANT(bf16, FBF16)

extern "C" __global__ void add_bias_rows(float* __restrict__ y, const float* __restrict__ bias, long long total, int n) { pdl_enter();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
        y[i] += bias[i % n];
}
