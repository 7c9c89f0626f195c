// Mixture-of-experts routing and combination around cuda_quant's per-slot expert GEMVs.
//
// moe_route: one warp per token. Picks the k largest router logits (ties: lower expert index,
//   as a stable argsort), and their weights softmax(logits[picked]) over the k picked only.
//   k rounds of a warp arg-max; E may exceed 32 (each lane scans a strided part).
// moe_act:   a[t,j,:] from gate g and up u of each slot: silu(g)*u, or gpt-oss's clamped
//   swiglu  g' = min(g, limit), u' = clip(u, -limit, limit), a = g' * sigmoid(alpha g') * (u' + 1);
//   moe_act_q8 writes it as int8 levels and scales only (the int8 down projection's input).
// moe_combine: out[t,:] = sum_j p[t,j] * y[t,j,:]  (fixed slot order: deterministic).
#include "common.cuh"

extern "C" __global__ void moe_route(const float* __restrict__ logits, int T, int E, int k, int* __restrict__ ids,
                                     float* __restrict__ weights) { pdl_enter();
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= T) return;
    const float* l = logits + (size_t)t * E;
    float lim_v = INFINITY;
    int lim_i = -1;
    float my_v = -INFINITY;  // lane j keeps the j-th picked logit
    int my_i = 0;
    for (int j = 0; j < k; ++j) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int e = lane; e < E; e += 32) {
            const float v = l[e];
            const bool below = v < lim_v || (v == lim_v && e > lim_i);
            if (below && (v > bv || (v == bv && e < bi))) { bv = v; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        lim_v = bv;
        lim_i = bi;
        if (lane == j) { my_v = bv; my_i = bi; }
    }
    // softmax over the k picked (k <= 32); the first pick is the maximum
    const float m = __shfl_sync(FULL_MASK, my_v, 0);
    const float p = lane < k ? __expf(my_v - m) : 0.f;
    const float s = warp_sum(p);
    if (lane < k) {
        ids[(size_t)t * k + lane] = my_i;
        weights[(size_t)t * k + lane] = p / s;
    }
}

__device__ __forceinline__ float moe_act_value(float gv, float uv, int oai, float alpha, float limit) {
    if (oai) {
        gv = fminf(gv, limit);
        uv = fminf(fmaxf(uv, -limit), limit);
        return gv / (1.f + __expf(-alpha * gv)) * (uv + 1.f);
    }
    return gv / (1.f + __expf(-gv)) * uv;
}

extern "C" __global__ void moe_act(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ a,
                                   long long n, int oai, float alpha, float limit) { pdl_enter();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        a[i] = moe_act_value(g[i], u[i], oai, alpha, limit);
}

// moe_act_q8: the same activation written only as the down projection's int8 input (what quantize_x8
// of moe_act's output would write: levels aq, a scale ad per 32), for the int8 expert paths. A warp per
// 32 values: blockIdx.x * 8 + warp is the block, n % 32 == 0.
extern "C" __global__ void moe_act_q8(const float* __restrict__ g, const float* __restrict__ u, int8_t* __restrict__ aq,
                                      float* __restrict__ ad, long long n, int oai, float alpha, float limit) { pdl_enter();
    const long long blk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (blk * 32 >= n) return;  // the whole warp
    const long long i = blk * 32 + lane;
    q8_store_warp(moe_act_value(g[i], u[i], oai, alpha, limit), aq + blk * 32, ad + blk, 0, lane);
}

extern "C" __global__ void moe_combine(const float* __restrict__ y, const float* __restrict__ w, float* __restrict__ out,
                                       int T, int k, int d) { pdl_enter();
    const int t = blockIdx.y;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < k; ++j) acc = fmaf(w[(size_t)t * k + j], y[((size_t)t * k + j) * d + i], acc);
        out[(size_t)t * d + i] = acc;
    }
}
