// Shared helpers for orcd's kernels: warp/block reductions and vector types.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch (cuda_graph.py makes the kernel-to-kernel edges of a captured decode
// graph programmatic): a kernel may then be scheduled while the one before it still runs. Every
// kernel calls this first, before it reads or writes any global memory: it waits until the previous
// kernel has finished and its writes are visible, then lets the next one be scheduled, so at most one
// kernel waits beside a running one. Outside such a graph both instructions return at once.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// 16-byte copies from global to shared memory that do not hold a register while in flight
// (cp.async, sm_80 on): commit closes a group, wait<N> lets at most N groups stay in flight.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {  // through L1 (.ca): 4 bytes
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait0() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Byte i of v (0..255) as a float minus `bias`, without the quarter-rate I2F: 0x4B0000xx is the
// float 2^23 + xx exactly, so subtracting (2^23 + bias) is exact for every byte value.
template <int I>
__device__ __forceinline__ float bytef(uint32_t v, float bias) {
    return __int_as_float(__byte_perm(v, 0x4B000000u, 0x7550u | I)) - (8388608.0f + bias);
}
__device__ __forceinline__ void bytes4(uint32_t v, float bias, float* q) {
    q[0] = bytef<0>(v, bias); q[1] = bytef<1>(v, bias); q[2] = bytef<2>(v, bias); q[3] = bytef<3>(v, bias);
}
// The four int8 of v as floats, exactly: flipping each byte's sign bit maps -128..127 to 0..255.
__device__ __forceinline__ void sbytes4(uint32_t v, float* q) { bytes4(v ^ 0x80808080u, 128.f, q); }
// The two int8 of a char2's bits (low 16 of v) as floats, exactly.
__device__ __forceinline__ float2 sbytes2(uint32_t v) {
    v ^= 0x8080u;
    return make_float2(bytef<0>(v, 128.f), bytef<1>(v, 128.f));
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// gelu with the tanh approximation, as ggml's gelu and gemma use.
__device__ __forceinline__ float gelu_tanh(float g) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    return 0.5f * g * (1.f + tanhf(k0 * (g + k1 * g * g * g)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// v rounded to int8 against its 32-element block's scale d = m / 127 (m = the block's max |v|): the
// input of the int8 GEMVs. Clamped: a fast-math division may land a hair past 127 for the largest.
__device__ __forceinline__ int8_t q8_round(float v, float d, float m) {
    return static_cast<int8_t>(m > 0.f ? max(-127, min(127, __float2int_rn(v / d))) : 0);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// A warp's 32 values (v on each lane: block blk of 32) rounded to int8 into xq, with the block's
// scale max|v| / 127 into xd[blk]: what quantize_x8 writes, and the one-warp-per-block *_q8 producers.
__device__ __forceinline__ void q8_store_warp(float v, int8_t* xq, float* xd, int blk, int lane) {
    const float m = warp_max(fabsf(v));
    xq[blk * 32 + lane] = q8_round(v, m / 127.f, m);
    if (lane == 0) xd[blk] = m / 127.f;
}

// Sum over the whole block; `scratch` holds 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// Block reduction of per-thread (value, index) candidates to the block's arg-max: largest value,
// lowest index on ties (sample.cu's top logprobs and score.cu's top-N share the order).
__device__ __forceinline__ void argmax_reduce(float bv, int bi, float* out_v, int* out_i, float* sv, int* si) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { sv[wid] = bv; si[wid] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (sv[w] > sv[0] || (sv[w] == sv[0] && si[w] < si[0])) { sv[0] = sv[w]; si[0] = si[w]; }
        *out_v = sv[0];
        *out_i = si[0];
    }
    __syncthreads();
}
