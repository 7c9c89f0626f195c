// The Q8_0 KV cache's rows (attention.cu describes the format): each 32-value block is turned by a
// Walsh-Hadamard transform, then rounded as GGML's Q8_0 (an f16 scale, 32 int8 levels). Shared by
// the cache's stores (attention.cu's kv_store_q8, rope.cu's fused qkv_rope_store_q8) and the
// attention kernels that turn q and their output the same way.
#pragma once
#include "common.cuh"

// H x / sqrt(32) of the warp's 32 values (lane i holds x_i): the butterflies of cpu_ops.wht32 in
// the same order, so the same float32 bits.
__device__ __forceinline__ float wht32_warp(float x, int lane) {
#pragma unroll
    for (int h = 1; h < 32; h <<= 1) {
        const float y = __shfl_xor_sync(FULL_MASK, x, h);
        x = (lane & h) ? y - x : x + y;
    }
    return x * 0.17677669529663687f;
}

// The warp's 32 values (lane i holds y_i) rounded as one Q8_0 block, as cpu_ops._put_q8, bit for
// bit: returns the scale d = amax / 127 (in float), lane i's level round(y * (1 / d)) to *level with
// halves away from zero (IEEE division and reciprocal: fast math would move a level now and then).
__device__ __forceinline__ float q8_round_warp(float y, int8_t* level) {
    const float amax = warp_max(fabsf(y));
    const float d = __fdiv_rn(amax, 127.f);
    const float inv = d != 0.f ? __frcp_rn(d) : 0.f;
    const float r = floorf(fabsf(y * inv) + 0.5f);
    *level = static_cast<int8_t>(y * inv >= 0.f ? r : -r);
    return d;
}

// The warp's 32 values (lane i holds x_i) turned and stored as one Q8_0 block: lane i's level to
// levels[i], the scale (as a half) to *scale.
__device__ __forceinline__ void q8_store_turned(float x, int lane, int8_t* __restrict__ levels,
                                                __half* __restrict__ scale) {
    const float d = q8_round_warp(wht32_warp(x, lane), levels + lane);
    if (lane == 0) *scale = __float2half_rn(d);
}
