// Rotary position embedding of x [T, H, D] -> y [T, H, D] (a separate buffer). The first `rot`
// features of each head rotate; the rest are copied.
//
// inv_freq[i] (i < rot/2) already folds in the base, the freq factors and the YaRN mix; the
// host computes it in float64 once per RopeSpec. The angle pos * inv_freq is formed and reduced
// modulo 2*pi in double precision: positions reach 1e5 and more, where a float32 product would
// be off by ~1e-2 rad, and the fast-math sin/cos are only accurate on a reduced argument.
//   neox = 0: pairs (2i, 2i+1)      neox = 1: pairs (i, i + rot/2)
#include "kv_q8.cuh"

// Pair i of a head at position p: (a, b) -> (a cos - b sin, a sin + b cos), both scaled by mscale.
__device__ __forceinline__ void rope_rotate(float a, float b, int p, const double* __restrict__ inv_freq, int i,
                                            float mscale, float& ya, float& yb) {
    double ang = (double)p * inv_freq[i];
    const double two_pi = 6.283185307179586;
    ang -= two_pi * rint(ang / two_pi);
    float s, c;
    sincosf((float)ang, &s, &c);
    c *= mscale;
    s *= mscale;
    ya = a * c - b * s;
    yb = a * s + b * c;
}

// rope_pair_f32: q [T, Hq, D] -> yq and k [T, Hk, D] -> yk in one launch (same positions and
// spec); the items of k follow those of q.
__device__ __forceinline__ void rope_item(const float* __restrict__ x, float* __restrict__ y,
                                          const int* __restrict__ pos, const double* __restrict__ inv_freq,
                                          long long idx, int H, int D, int rot, int neox, float mscale);

extern "C" __global__ void rope_f32(const float* __restrict__ x, float* __restrict__ y,
                                    const int* __restrict__ pos, const double* __restrict__ inv_freq,
                                    int T, int H, int D, int rot, int neox, float mscale) { pdl_enter();
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)T * H * (D - (rot >> 1))) return;
    rope_item(x, y, pos, inv_freq, idx, H, D, rot, neox, mscale);
}

extern "C" __global__ void rope_pair_f32(const float* __restrict__ q, float* __restrict__ yq,
                                         const float* __restrict__ k, float* __restrict__ yk,
                                         const int* __restrict__ pos, const double* __restrict__ inv_freq,
                                         int T, int Hq, int Hk, int D, int rot, int neox, float mscale) { pdl_enter();
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nq = (long long)T * Hq * (D - (rot >> 1));
    if (idx < nq) rope_item(q, yq, pos, inv_freq, idx, Hq, D, rot, neox, mscale);
    else if (idx < nq + (long long)T * Hk * (D - (rot >> 1)))
        rope_item(k, yk, pos, inv_freq, idx - nq, Hk, D, rot, neox, mscale);
}

__device__ __forceinline__ void rope_item(const float* __restrict__ x, float* __restrict__ y,
                                          const int* __restrict__ pos, const double* __restrict__ inv_freq,
                                          long long idx, int H, int D, int rot, int neox, float mscale) {
    const int half = rot >> 1;
    const int pairs = D - half;  // rot/2 rotating pairs, then D - rot pass-through features
    const int i = (int)(idx % pairs);
    const long long row = idx / pairs;  // t * H + h
    const int t = (int)(row / H);
    const float* xr = x + row * D;
    float* yr = y + row * D;
    if (i >= half) {  // pass-through features beyond the rotated ones
        const int j = rot + (i - half);
        yr[j] = xr[j];
        return;
    }
    const int ia = neox ? i : 2 * i;
    const int ib = neox ? i + half : 2 * i + 1;
    rope_rotate(xr[ia], xr[ib], pos[t], inv_freq, i, mscale, yr[ia], yr[ib]);
}

// qkv_rope_store_f32: one row per token of a fused Q/K/V projection, [q (Hq*D) | k (Hk*D) | v (Hk*Dv)].
// q is roped into yq [T, Hq, D]; k is roped and v copied, both rounded to f16, straight into the
// paged cache at slots[t] (layout as kv_store_f16; slot < 0: a padding token, nothing stored).
// Replaces split3 + rope_pair + kv_store_f16 (three launches per layer).
extern "C" __global__ void qkv_rope_store_f32(const float* __restrict__ qkv, float* __restrict__ yq,
                                              __half* __restrict__ kc, __half* __restrict__ vc,
                                              const int* __restrict__ pos, const int* __restrict__ slots,
                                              const double* __restrict__ inv_freq, int T, int Hq, int Hk, int D,
                                              int Dv, int rot, int neox, float mscale) { pdl_enter();
    const int t = blockIdx.y;
    const int half = rot >> 1, pairs = D - half;
    const long long width = (long long)(Hq + Hk) * D + (long long)Hk * Dv;
    const float* row = qkv + t * width;
    const int nq = Hq * pairs, nk = Hk * pairs, nv = Hk * Dv;
    const int slot = slots[t];
    const int p = pos[t];
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < nq + nk + nv; idx += gridDim.x * blockDim.x) {
        if (idx >= nq + nk) {
            if (slot >= 0) {
                const int j = idx - nq - nk;  // h * Dv + d
                vc[(size_t)slot * nv + j] = __float2half_rn(row[(size_t)(Hq + Hk) * D + j]);
            }
            continue;
        }
        const bool isq = idx < nq;
        if (!isq && slot < 0) continue;
        const int j = isq ? idx : idx - nq;
        const int h = j / pairs, i = j - h * pairs;
        const float* xr = row + (isq ? 0 : (size_t)Hq * D) + (size_t)h * D;
        int ia, ib = -1;
        float ya, yb = 0.f;
        if (i >= half) {  // pass-through features beyond the rotated ones
            ia = rot + (i - half);
            ya = xr[ia];
        } else {
            ia = neox ? i : 2 * i;
            ib = neox ? i + half : 2 * i + 1;
            rope_rotate(xr[ia], xr[ib], p, inv_freq, i, mscale, ya, yb);
        }
        if (isq) {
            float* yr = yq + ((size_t)t * Hq + h) * D;
            yr[ia] = ya;
            if (ib >= 0) yr[ib] = yb;
        } else {
            __half* kr = kc + ((size_t)slot * Hk + h) * D;
            kr[ia] = __float2half_rn(ya);
            if (ib >= 0) kr[ib] = __float2half_rn(yb);
        }
    }
}

// qkv_rope_store_q8: qkv_rope_store_f32 for a Q8_0 cache (layout as kv_store_q8). A warp per 32
// values of the row: lane i ropes its own value (reading its pair partner, which may lie in
// another block when neox), then a k or v block is turned and rounded by q8_store_turned. The
// values are those rope_pair_f32 gives, so the cache holds what split + rope + kv_store_q8 store.
// Grid (blocks / 8, T), 256 threads; D and Dv are multiples of 32.
extern "C" __global__ void qkv_rope_store_q8(const float* __restrict__ qkv, float* __restrict__ yq,
                                             int8_t* __restrict__ kq, int8_t* __restrict__ vq,
                                             __half* __restrict__ ks, __half* __restrict__ vs,
                                             const int* __restrict__ pos, const int* __restrict__ slots,
                                             const double* __restrict__ inv_freq, int T, int Hq, int Hk, int D,
                                             int Dv, int rot, int neox, float mscale) { pdl_enter();
    const int t = blockIdx.y, lane = threadIdx.x & 31;
    const int nq = Hq * D / 32, nk = Hk * D / 32, nv = Hk * Dv / 32;  // 32-value blocks of each part
    const float* row = qkv + (size_t)t * ((size_t)(Hq + Hk) * D + (size_t)Hk * Dv);
    const int slot = slots[t], p = pos[t], half = rot >> 1;
    for (int blk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); blk < nq + nk + nv;
         blk += gridDim.x * (blockDim.x >> 5)) {
        if (blk >= nq && slot < 0) break;  // a padding token: nothing to store (warp-uniform)
        const int j = blk * 32 + lane;     // this lane's value in the row
        if (blk >= nq + nk) {
            const int bv = blk - nq - nk;
            q8_store_turned(row[j], lane, vq + ((size_t)slot * nv + bv) * 32, vs + (size_t)slot * nv + bv);
            continue;
        }
        const bool isq = blk < nq;
        const int jh = isq ? j : j - Hq * D, e = jh % D;  // e: the value's place in its head
        const float* xr = row + (isq ? 0 : (size_t)Hq * D) + (size_t)(jh - e);
        float y = xr[e];
        if (e < rot) {
            const int i = neox ? (e < half ? e : e - half) : e >> 1;
            const int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
            float ya, yb;
            rope_rotate(xr[ia], xr[ib], p, inv_freq, i, mscale, ya, yb);
            y = e == ia ? ya : yb;
        }
        if (isq) {
            yq[(size_t)t * Hq * D + j] = y;
        } else {
            const int bk = blk - nq;
            q8_store_turned(y, lane, kq + ((size_t)slot * nk + bk) * 32, ks + (size_t)slot * nk + bk);
        }
    }
}
