// Elementwise and data-movement kernels: gated activations, add, scale, column split, row gather.
// All float32, grid-stride loops over n elements; the _v4 variants take 16-byte vectors and are
// used when n % 4 == 0 (every tensor the backend allocates is 256-byte aligned).
#include "common.cuh"

#define GRID_STRIDE(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                               i += (long long)gridDim.x * blockDim.x)

// op: 0 silu(a)*b, 1 gelu(a)*b, 2 a+b, 3 a*s
template <int OP>
__device__ __forceinline__ float apply(float a, float b, float s) {
    if (OP == 0) return silu(a) * b;
    if (OP == 1) return gelu_tanh(a) * b;
    if (OP == 2) return a + b;
    return a * s;
}

template <int OP>
__device__ __forceinline__ void binary_v4(const float* a, const float* b, float* y, long long n4, float s) {
    const float4* a4 = reinterpret_cast<const float4*>(a);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    float4* y4 = reinterpret_cast<float4*>(y);
    GRID_STRIDE(i, n4) {
        float4 u = a4[i], v = OP == 3 ? u : b4[i];
        y4[i] = make_float4(apply<OP>(u.x, v.x, s), apply<OP>(u.y, v.y, s), apply<OP>(u.z, v.z, s),
                            apply<OP>(u.w, v.w, s));
    }
}

template <int OP>
__device__ __forceinline__ void binary_v1(const float* a, const float* b, float* y, long long n, float s) {
    GRID_STRIDE(i, n) y[i] = apply<OP>(a[i], OP == 3 ? 0.f : b[i], s);
}

#define BINARY(name, OP)                                                                          \
    extern "C" __global__ void name(const float* __restrict__ a, const float* __restrict__ b,    \
                                    float* __restrict__ y, long long n, float s) { pdl_enter();   \
        if ((n & 3) == 0) binary_v4<OP>(a, b, y, n >> 2, s);                                      \
        else binary_v1<OP>(a, b, y, n, s);                                                        \
    }

BINARY(silu_mul_f32, 0)
BINARY(gelu_mul_f32, 1)
BINARY(add_f32, 2)
BINARY(scale_f32, 3)

// Row r of x [., ld_x], columns [col0, col0 + w), into row r of y [., w]; 16-byte vectors when aligned.
__device__ __forceinline__ void copy_row_cols(const float* __restrict__ x, float* __restrict__ y, int r, int ld_x,
                                              int col0, int w) {
    const float* src = x + (size_t)r * ld_x + col0;
    float* dst = y + (size_t)r * w;
    if (((ld_x | col0 | w) & 3) == 0) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (w >> 2); i += gridDim.x * blockDim.x) d4[i] = s4[i];
    } else {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < w; i += gridDim.x * blockDim.x) dst[i] = src[i];
    }
}

// y[r, :] = act(x[r, :F]) * x[r, F:2F] for the rows of a fused gate/up projection x [rows, 2F].
template <int OP>
__device__ __forceinline__ void glu_halves(const float* __restrict__ x, float* __restrict__ y, int rows, int F) {
    const long long n = (long long)rows * F;
    GRID_STRIDE(i, n) {
        const long long r = i / F, c = i - r * F;
        const float* xr = x + r * 2 * F;
        y[i] = apply<OP>(xr[c], xr[F + c], 0.f);
    }
}
extern "C" __global__ void silu_halves_f32(const float* x, float* y, int rows, int F) { pdl_enter(); glu_halves<0>(x, y, rows, F); }

// glu_halves for a few rows (blockIdx.y; F % 32 == 0) that also writes y rounded to int8 with a scale
// per 32 elements (q8_round), the down projection's int8 GEMV input (ORCD_FUSE_Q8). A warp per 32 columns.
template <int OP>
__device__ __forceinline__ void glu_halves_q8(const float* __restrict__ x, float* __restrict__ y,
                                              int8_t* __restrict__ xq, float* __restrict__ xd, int F) {
    const int blk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (blk * 32 >= F) return;  // the whole warp
    const long long row = blockIdx.y;
    x += row * 2 * F; y += row * F; xq += row * F; xd += row * (F / 32);
    const int c = blk * 32 + lane;
    const float v = apply<OP>(x[c], x[F + c], 0.f);
    y[c] = v;
    q8_store_warp(v, xq, xd, blk, lane);
}
extern "C" __global__ void silu_halves_q8(const float* x, float* y, int8_t* xq, float* xd, int F) { pdl_enter();
    glu_halves_q8<0>(x, y, xq, xd, F);
}
extern "C" __global__ void gelu_halves_q8(const float* x, float* y, int8_t* xq, float* xd, int F) { pdl_enter();
    glu_halves_q8<1>(x, y, xq, xd, F);
}
extern "C" __global__ void gelu_halves_f32(const float* x, float* y, int rows, int F) { pdl_enter(); glu_halves<1>(x, y, rows, F); }

// Column split into up to three outputs in one launch: piece p = blockIdx.z gets columns
// [c_p, c_p + w_p) of each row of x [rows, ld_x]; c_0 = 0, c_1 = w_0, c_2 = w_0 + w_1.
extern "C" __global__ void split3_f32(const float* __restrict__ x, float* __restrict__ y0, float* __restrict__ y1,
                                      float* __restrict__ y2, int rows, int ld_x, int w0, int w1, int w2) { pdl_enter();
    const int p = blockIdx.z;
    const int w = p == 0 ? w0 : p == 1 ? w1 : w2;
    copy_row_cols(x, p == 0 ? y0 : p == 1 ? y1 : y2, blockIdx.y, ld_x, p == 0 ? 0 : p == 1 ? w0 : w0 + w1, w);
}

// y[r, :] = x[r, col0 : col0 + w] for r < rows; x has ld_x columns. One block row per grid.y.
extern "C" __global__ void copy_cols_f32(const float* __restrict__ x, float* __restrict__ y, int rows, int ld_x,
                                         int col0, int w) { pdl_enter();
    if (blockIdx.y < rows) copy_row_cols(x, y, blockIdx.y, ld_x, col0, w);
}

// y[i, :] = x[idx[i], :] for i < n_rows, rows of d floats.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, const int* __restrict__ idx,
                                           float* __restrict__ y, int n_rows, int d) { pdl_enter();
    const int r = blockIdx.y;
    if (r >= n_rows) return;
    const float* src = x + (size_t)idx[r] * d;
    float* dst = y + (size_t)r * d;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) dst[i] = src[i];
}
