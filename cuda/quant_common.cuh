// Block decoders for the GGUF weight formats orcd keeps in VRAM.
//
// Every format is described by a struct with the same shape so one kernel template serves all:
//   QK    elements per block, TS bytes per block (GGUF type_size), NP = QK/8 parts per block
//   CHB   blocks a GEMV warp stages per k-chunk (chosen so a row chunk is ~0.5-1 KB)
//   MIN   true when a weight is a*q + m (an offset term) rather than a*q
//   offs(p, o0, o1)   part p covers block elements o0..o0+3 and o1..o1+3
//   qv(b, p, q[8])     the part's quantized values as floats (offsets such as -8 already applied)
//   qi(b, p, lo, hi)   (the K-quants) the same 8 values as two words of 4 signed bytes, before the
//                      offset QB is taken off (q - QB is what qv gives), for the int8-activation GEMV
//   sc(b, p, a0, a1, m0, m1)  its scales: w[i] = a_{i/4} * q[i] (+ m_{i/4} when MIN); identical for the
//                      4 parts 4g..4g+3 of an aligned group (GEMV decodes scales once per group)
//   qi_at(s, p, lo, hi), sc_at(s, a0, a1, m0, m1)  (the 32-weight integer formats) qi and sc on a byte
//                      source: the block in memory (Ptr, what sc is) or in registers (BlockWords, the
//                      int8 GEMV's whole block a lane)
// A part's 8 elements always lie inside one aligned 64-element window of the row (32 for QK=32
// formats) and parts 8w..8w+7 (global part index = element/8 numbering of windows) fill window w,
// so a GEMM k-tile of 64 elements decodes exactly the parts whose index is in [kk/8, kk/8+8).
// Layouts follow ggml-common.h; the decoders are written from the layout, not copied.
//
// `b` may point into global or shared memory (generic addressing). The raw bytes are never
// reinterpreted with more alignment than the format guarantees: block starts are only TS-aligned
// (Q4_0: 18 bytes -> 2-aligned, MXFP4: 17 -> 1-aligned), and GEMV's shared-memory staging keeps
// the global address modulo 16, so the same alignment reasoning holds in both places.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace oq {

template <int AL>
__device__ __forceinline__ uint32_t ld32(const uint8_t* p) {
    if constexpr (AL >= 4) {
        return *reinterpret_cast<const uint32_t*>(p);
    } else if constexpr (AL == 2) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
        return uint32_t(h[0]) | (uint32_t(h[1]) << 16);
    } else {
        return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
    }
}

__device__ __forceinline__ float ldh(const uint8_t* p) {  // f16 at a 2-aligned address
    return __half2float(*reinterpret_cast<const __half*>(p));
}

// Where the integer formats' qi_at / sc_at read a block's bytes: BlockWords<TS> is the whole block
// in registers (at(o): the 4 bytes at offset o; h(o): the f16 at o; b(o): byte o); Ptr the block in
// memory, for sc_at (sc), which reads only h and b.
struct Ptr {
    const uint8_t* p;
    __device__ __forceinline__ float h(int o) const { return ldh(p + o); }
    __device__ __forceinline__ uint32_t b(int o) const { return p[o]; }
};

// A whole block of an integer format from NL aligned 32-bit loads, funnel-shifted so that f[i] holds
// its bytes 4i..4i+3 (a block starts at any multiple of its alignment AL: the largest power of two
// dividing TS, at most 4), instead of up to five narrow loads per 8-weight part: the int8 GEMV's
// lane (the block in shared memory) and the MXFP4 GEMM tiles' block_h2 (NC: read-only global
// memory, through __ldg). Reads at most TAIL bytes past the block.
template <int TS, bool NC = false>
struct BlockWords {
    static constexpr int AL = TS % 4 == 0 ? 4 : TS % 2 == 0 ? 2 : 1;
    static constexpr int NW = (TS + 3) / 4;                              // words of the block
    static constexpr int NL = (TS + (AL == 4 ? 0 : 4 - AL) + 3) / 4;    // aligned loads that cover it
    static constexpr int TAIL = 4 * NL - TS;                             // read past it when it is aligned
    uint32_t f[NW + 1];
    __device__ __forceinline__ explicit BlockWords(const uint8_t* blk) {
        const uintptr_t ad = reinterpret_cast<uintptr_t>(blk);
        // shared memory: pointer arithmetic, not an integer mask, so the compiler keeps its loads as such
        const uint32_t* w = NC ? reinterpret_cast<const uint32_t*>(ad & ~uintptr_t(3))
                               : reinterpret_cast<const uint32_t*>(blk - (ad & 3));
        uint32_t x[NW + 1];
#pragma unroll
        for (int i = 0; i <= NW; i++) x[i] = i >= NL ? 0u : NC ? __ldg(w + i) : w[i];
        if constexpr (AL == 4) {
#pragma unroll
            for (int i = 0; i <= NW; i++) f[i] = x[i];
        } else {
            const uint32_t sh = uint32_t(ad & 3) * 8;
#pragma unroll
            for (int i = 0; i < NW; i++) f[i] = i + 1 < NL ? __funnelshift_r(x[i], x[i + 1], sh) : x[i] >> sh;
            f[NW] = 0u;
        }
    }
    __device__ __forceinline__ uint32_t at(int o) const {
        return (o & 3) == 0 ? f[o >> 2] : __byte_perm(f[o >> 2], f[(o >> 2) + 1], 0x3210u + 0x1111u * uint32_t(o & 3));
    }
    __device__ __forceinline__ float h(int o) const { return __half2float(__ushort_as_half((unsigned short)(at(o) & 0xFFFFu))); }
    __device__ __forceinline__ uint32_t b(int o) const { return (f[o >> 2] >> (8 * (o & 3))) & 0xFFu; }
};

// The low 4 bits of x moved to bit 0 of each byte (bit i -> byte i); shifts do not overlap so no carries.
__device__ __forceinline__ uint32_t spread4(uint32_t x) { return ((x & 0xFu) * 0x00204081u) & 0x01010101u; }

struct FQ4_0 {  // d f16 | qs[16]: elem j = lo(qs[j]), elem j+16 = hi(qs[j]); w = d*(q-8)
    static constexpr int QK = 32, TS = 18, NP = 4, CHB = 32; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 4 * p; o1 = 16 + 4 * p; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const uint32_t v = ld32<2>(b + 2 + 4 * p);
        bytes4(v & 0x0F0F0F0Fu, 8.f, q); bytes4((v >> 4) & 0x0F0F0F0Fu, 8.f, q + 4);
    }
    static constexpr int QB = 8;
    template <class S> __device__ static void qi_at(const S& s, int p, uint32_t& lo, uint32_t& hi) {
        const uint32_t v = s.at(2 + 4 * p); lo = v & 0x0F0F0F0Fu; hi = (v >> 4) & 0x0F0F0F0Fu;
    }
    template <class S> __device__ static void sc_at(const S& s, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = s.h(0); m0 = m1 = 0.f; }
    __device__ static void sc(const uint8_t* b, int, float& a0, float& a1, float& m0, float& m1) { sc_at(Ptr{b}, a0, a1, m0, m1); }
};
struct FQ4_1 {  // d, m f16 | qs[16]; w = d*q + m
    static constexpr int QK = 32, TS = 20, NP = 4, CHB = 32; static constexpr bool MIN = true;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 4 * p; o1 = 16 + 4 * p; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const uint32_t v = ld32<4>(b + 4 + 4 * p);
        bytes4(v & 0x0F0F0F0Fu, 0.f, q); bytes4((v >> 4) & 0x0F0F0F0Fu, 0.f, q + 4);
    }
    static constexpr int QB = 0;
    template <class S> __device__ static void qi_at(const S& s, int p, uint32_t& lo, uint32_t& hi) {
        const uint32_t v = s.at(4 + 4 * p); lo = v & 0x0F0F0F0Fu; hi = (v >> 4) & 0x0F0F0F0Fu;
    }
    template <class S> __device__ static void sc_at(const S& s, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = s.h(0); m0 = m1 = s.h(2); }
    __device__ static void sc(const uint8_t* b, int, float& a0, float& a1, float& m0, float& m1) { sc_at(Ptr{b}, a0, a1, m0, m1); }
};
struct FQ5_0 {  // d f16 | qh u32 (bit j = 5th bit of elem j) | qs[16]; w = d*(q-16)
    static constexpr int QK = 32, TS = 22, NP = 4, CHB = 32; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 4 * p; o1 = 16 + 4 * p; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const uint32_t qh = ld32<2>(b + 2), v = ld32<2>(b + 6 + 4 * p);
        bytes4((v & 0x0F0F0F0Fu) | (spread4(qh >> (4 * p)) << 4), 16.f, q);
        bytes4(((v >> 4) & 0x0F0F0F0Fu) | (spread4(qh >> (16 + 4 * p)) << 4), 16.f, q + 4);
    }
    static constexpr int QB = 16;
    template <class S> __device__ static void qi_at(const S& s, int p, uint32_t& lo, uint32_t& hi) {
        const uint32_t qh = s.at(2), v = s.at(6 + 4 * p);
        lo = (v & 0x0F0F0F0Fu) | (spread4(qh >> (4 * p)) << 4);
        hi = ((v >> 4) & 0x0F0F0F0Fu) | (spread4(qh >> (16 + 4 * p)) << 4);
    }
    template <class S> __device__ static void sc_at(const S& s, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = s.h(0); m0 = m1 = 0.f; }
    __device__ static void sc(const uint8_t* b, int, float& a0, float& a1, float& m0, float& m1) { sc_at(Ptr{b}, a0, a1, m0, m1); }
};
struct FQ5_1 {  // d, m f16 | qh u32 | qs[16]; w = d*q + m
    static constexpr int QK = 32, TS = 24, NP = 4, CHB = 32; static constexpr bool MIN = true;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 4 * p; o1 = 16 + 4 * p; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const uint32_t qh = ld32<4>(b + 4), v = ld32<4>(b + 8 + 4 * p);
        bytes4((v & 0x0F0F0F0Fu) | (spread4(qh >> (4 * p)) << 4), 0.f, q);
        bytes4(((v >> 4) & 0x0F0F0F0Fu) | (spread4(qh >> (16 + 4 * p)) << 4), 0.f, q + 4);
    }
    static constexpr int QB = 0;
    template <class S> __device__ static void qi_at(const S& s, int p, uint32_t& lo, uint32_t& hi) {
        const uint32_t qh = s.at(4), v = s.at(8 + 4 * p);
        lo = (v & 0x0F0F0F0Fu) | (spread4(qh >> (4 * p)) << 4);
        hi = ((v >> 4) & 0x0F0F0F0Fu) | (spread4(qh >> (16 + 4 * p)) << 4);
    }
    template <class S> __device__ static void sc_at(const S& s, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = s.h(0); m0 = m1 = s.h(2); }
    __device__ static void sc(const uint8_t* b, int, float& a0, float& a1, float& m0, float& m1) { sc_at(Ptr{b}, a0, a1, m0, m1); }
};
struct FQ8_0 {  // d f16 | qs[32] int8; w = d*q
    static constexpr int QK = 32, TS = 34, NP = 4, CHB = 32; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 8 * p; o1 = 8 * p + 4; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        sbytes4(ld32<2>(b + 2 + 8 * p), q);
        sbytes4(ld32<2>(b + 6 + 8 * p), q + 4);
    }
    static constexpr int QB = 0;  // signed bytes as they are
    template <class S> __device__ static void qi_at(const S& s, int p, uint32_t& lo, uint32_t& hi) {
        lo = s.at(2 + 8 * p); hi = s.at(6 + 8 * p);
    }
    template <class S> __device__ static void sc_at(const S& s, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = s.h(0); m0 = m1 = 0.f; }
    __device__ static void sc(const uint8_t* b, int, float& a0, float& a1, float& m0, float& m1) { sc_at(Ptr{b}, a0, a1, m0, m1); }
};
struct FMXFP4 {  // e8m0 exponent byte | qs[16] e2m1 nibbles (lo: elem j, hi: elem j+16)
    static constexpr int QK = 32, TS = 17, NP = 4, CHB = 32; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 4 * p; o1 = 16 + 4 * p; }
    // four nibbles (one per byte of n) -> four int8 e2m1 values (doubled: 0,1,2,3,4,6,8,12, sign in bit 3),
    // looked up with two byte permutes (magnitude table, negative table) and a per-byte select.
    __device__ static uint32_t lut4(uint32_t n) {
        uint32_t s = n | (n >> 4);
        s = (s & 0xFFu) | ((s >> 8) & 0xFF00u);  // 4 nibble selectors in the low 16 bits
        s &= 0x7777u;                             // the permute's bit 3 would mean "sign-replicate"
        const uint32_t pos = __byte_perm(0x03020100u, 0x0C080604u, s);
        const uint32_t neg = __byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, s);
        const uint32_t m = ((n >> 3) & 0x01010101u) * 0xFFu;
        return (pos & ~m) | (neg & m);
    }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const uint32_t v = ld32<1>(b + 1 + 4 * p);
        bytes4(lut4(v & 0x0F0F0F0Fu) ^ 0x80808080u, 128.f, q);
        bytes4(lut4((v >> 4) & 0x0F0F0F0Fu) ^ 0x80808080u, 128.f, q + 4);
    }
    static constexpr int QB = 0;  // lut4 gives signed bytes
    // The whole block as 16 f16 pairs (weights 2j, 2j+1 in h[j]), scale applied, from the five aligned
    // word loads covering its 17 bytes (BlockWords; QuantWeight pads its allocation, so the last word
    // is readable).
    __device__ static void block_h2(const uint8_t* b, uint32_t* h) {
        const BlockWords<TS, true> B(b);
        const uint32_t e = B.b(0);
        const float a = e >= 2 ? __uint_as_float((e - 1) << 23) : 0.f;  // as sc(): half the E8M0 scale
#pragma unroll
        for (int p = 0; p < 4; p++) {
            const uint32_t v = B.at(1 + 4 * p);  // qs bytes 4p..4p+3
            float q[8];
            bytes4(lut4(v & 0x0F0F0F0Fu) ^ 0x80808080u, 128.f, q);         // weights 4p..4p+3
            bytes4(lut4((v >> 4) & 0x0F0F0F0Fu) ^ 0x80808080u, 128.f, q + 4);  // weights 16+4p..
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const __half2 lo = __floats2half2_rn(a * q[2 * j], a * q[2 * j + 1]);
                const __half2 hi = __floats2half2_rn(a * q[4 + 2 * j], a * q[4 + 2 * j + 1]);
                h[2 * p + j] = *reinterpret_cast<const uint32_t*>(&lo);
                h[8 + 2 * p + j] = *reinterpret_cast<const uint32_t*>(&hi);
            }
        }
    }
    template <class S> __device__ static void qi_at(const S& s, int p, uint32_t& lo, uint32_t& hi) {
        const uint32_t v = s.at(1 + 4 * p);
        lo = lut4(v & 0x0F0F0F0Fu); hi = lut4((v >> 4) & 0x0F0F0F0Fu);
    }
    template <class S> __device__ static void sc_at(const S& s, float& a0, float& a1, float& m0, float& m1) {
        const uint32_t e = s.b(0);
        // 2^(e-128): half of the E8M0 scale, because the table holds doubled values. e<2 would be a
        // float denormal (flushed by fast-math); such scales are ~1e-38 and do not occur in models.
        a0 = a1 = e >= 2 ? __uint_as_float((e - 1) << 23) : 0.f; m0 = m1 = 0.f;
    }
    __device__ static void sc(const uint8_t* b, int, float& a0, float& a1, float& m0, float& m1) { sc_at(Ptr{b}, a0, a1, m0, m1); }
};
// K-quant 6-bit scale/min pairs, packed 12 bytes for 8 sub-blocks (ggml's get_scale_min_k4 layout)
__device__ __forceinline__ void kscale(const uint8_t* s, int j, float& sc, float& mn) {
    if (j < 4) { sc = float(s[j] & 63); mn = float(s[j + 4] & 63); }
    else {
        sc = float((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        mn = float((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}
struct FQ4_K {  // d, dmin f16 | scales[12] | qs[128]; 64-elem chunk c: lo nibbles of qs[32c..] -> elems 0..31, hi -> 32..63
    static constexpr int QK = 256, TS = 144, NP = 32, CHB = 4; static constexpr bool MIN = true;
    __device__ static void offs(int p, int& o0, int& o1) { const int c = p >> 3, l = (p & 7) * 4; o0 = 64 * c + l; o1 = o0 + 32; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const int c = p >> 3, l = (p & 7) * 4;
        const uint32_t v = ld32<4>(b + 16 + 32 * c + l);
        bytes4(v & 0x0F0F0F0Fu, 0.f, q); bytes4((v >> 4) & 0x0F0F0F0Fu, 0.f, q + 4);
    }
    static constexpr int QB = 0;
    __device__ static void qi(const uint8_t* b, int p, uint32_t& lo, uint32_t& hi) {
        const uint32_t v = ld32<4>(b + 16 + 32 * (p >> 3) + (p & 7) * 4);
        lo = v & 0x0F0F0F0Fu; hi = (v >> 4) & 0x0F0F0F0Fu;
    }
    __device__ static void sc(const uint8_t* b, int p, float& a0, float& a1, float& m0, float& m1) {
        const int c = p >> 3;
        const float d = ldh(b), dm = ldh(b + 2);
        float s0, n0, s1, n1; kscale(b + 4, 2 * c, s0, n0); kscale(b + 4, 2 * c + 1, s1, n1);
        a0 = d * s0; a1 = d * s1; m0 = -dm * n0; m1 = -dm * n1;
    }
};
struct FQ5_K {  // d, dmin | scales[12] | qh[32] | qs[128]; chunk c: qh bit 2c (lo) / 2c+1 (hi) of qh[l]
    static constexpr int QK = 256, TS = 176, NP = 32, CHB = 4; static constexpr bool MIN = true;
    __device__ static void offs(int p, int& o0, int& o1) { const int c = p >> 3, l = (p & 7) * 4; o0 = 64 * c + l; o1 = o0 + 32; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const int c = p >> 3, l = (p & 7) * 4;
        const uint32_t v = ld32<4>(b + 48 + 32 * c + l), h = ld32<4>(b + 16 + l);
        bytes4((v & 0x0F0F0F0Fu) | (((h >> (2 * c)) & 0x01010101u) << 4), 0.f, q);
        bytes4(((v >> 4) & 0x0F0F0F0Fu) | (((h >> (2 * c + 1)) & 0x01010101u) << 4), 0.f, q + 4);
    }
    static constexpr int QB = 0;
    __device__ static void qi(const uint8_t* b, int p, uint32_t& lo, uint32_t& hi) {
        const int c = p >> 3, l = (p & 7) * 4;
        const uint32_t v = ld32<4>(b + 48 + 32 * c + l), h = ld32<4>(b + 16 + l);
        lo = (v & 0x0F0F0F0Fu) | (((h >> (2 * c)) & 0x01010101u) << 4);
        hi = ((v >> 4) & 0x0F0F0F0Fu) | (((h >> (2 * c + 1)) & 0x01010101u) << 4);
    }
    __device__ static void sc(const uint8_t* b, int p, float& a0, float& a1, float& m0, float& m1) {
        const int c = p >> 3;
        const float d = ldh(b), dm = ldh(b + 2);
        float s0, n0, s1, n1; kscale(b + 4, 2 * c, s0, n0); kscale(b + 4, 2 * c + 1, s1, n1);
        a0 = d * s0; a1 = d * s1; m0 = -dm * n0; m1 = -dm * n1;
    }
};
struct FQ6_K {  // ql[128] | qh[64] | scales[16] int8 | d f16; w = d*sc[e/16]*(q-32)
    // half h (128 elems), quarter j at 128h+32j+l: low 4 bits = nibble (4*(j>>1)) of ql[64h + 32*(j&1) + l],
    // high 2 bits = bits 2j..2j+1 of qh[32h + l]. Part (h, t, l0) takes quarters 2t and 2t+1, so it stays
    // inside the 64-element window 128h + 64t.
    static constexpr int QK = 256, TS = 210, NP = 32, CHB = 4; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) {
        const int h = p >> 4, t = (p >> 3) & 1, l = (p & 7) * 4; o0 = 128 * h + 64 * t + l; o1 = o0 + 32;
    }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const int h = p >> 4, t = (p >> 3) & 1, l = (p & 7) * 4;
        const uint32_t v0 = ld32<2>(b + 64 * h + l), v1 = ld32<2>(b + 64 * h + 32 + l), qh = ld32<2>(b + 128 + 32 * h + l);
        const int sh = 4 * t;
        bytes4(((v0 >> sh) & 0x0F0F0F0Fu) | (((qh >> sh) & 0x03030303u) << 4), 32.f, q);
        bytes4(((v1 >> sh) & 0x0F0F0F0Fu) | (((qh >> (sh + 2)) & 0x03030303u) << 4), 32.f, q + 4);
    }
    static constexpr int QB = 32;
    __device__ static void qi(const uint8_t* b, int p, uint32_t& lo, uint32_t& hi) {
        const int h = p >> 4, t = (p >> 3) & 1, l = (p & 7) * 4, sh = 4 * t;
        const uint32_t v0 = ld32<2>(b + 64 * h + l), v1 = ld32<2>(b + 64 * h + 32 + l), qh = ld32<2>(b + 128 + 32 * h + l);
        lo = ((v0 >> sh) & 0x0F0F0F0Fu) | (((qh >> sh) & 0x03030303u) << 4);
        hi = ((v1 >> sh) & 0x0F0F0F0Fu) | (((qh >> (sh + 2)) & 0x03030303u) << 4);
    }
    __device__ static void sc(const uint8_t* b, int p, float& a0, float& a1, float& m0, float& m1) {
        const int h = p >> 4, t = (p >> 3) & 1, l = (p & 7) * 4;
        const float d = ldh(b + 208);
        const int8_t* s8 = reinterpret_cast<const int8_t*>(b + 192) + 8 * h + 4 * t + (l >> 4);
        a0 = d * float(s8[0]); a1 = d * float(s8[2]); m0 = m1 = 0.f;
    }
};
// Plain float rows, cut into 32-element pseudo-blocks so they share the part machinery (k % 32 == 0).
struct FF32 {
    static constexpr int QK = 32, TS = 128, NP = 4, CHB = 8; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 8 * p; o1 = 8 * p + 4; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const float4* f = reinterpret_cast<const float4*>(b + 32 * p);
        const float4 x = f[0], y = f[1];
        q[0] = x.x; q[1] = x.y; q[2] = x.z; q[3] = x.w; q[4] = y.x; q[5] = y.y; q[6] = y.z; q[7] = y.w;
    }
    __device__ static void sc(const uint8_t*, int, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = 1.f; m0 = m1 = 0.f; }
};
// F16 and BF16 rows: 32-element pseudo-blocks of 16-bit floats, 16 bytes per 8-weight part.
template <bool BF>
struct FHalf16 {
    static constexpr int QK = 32, TS = 64, NP = 4, CHB = 16; static constexpr bool MIN = false;
    __device__ static void offs(int p, int& o0, int& o1) { o0 = 8 * p; o1 = 8 * p + 4; }
    __device__ static void qv(const uint8_t* b, int p, float* q) {
        const uint4 v = *reinterpret_cast<const uint4*>(b + 16 * p);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if constexpr (BF) {  // bf16 is the top half of an f32
                q[2 * i] = __uint_as_float(w[i] << 16); q[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
            } else {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
                q[2 * i] = f.x; q[2 * i + 1] = f.y;
            }
        }
    }
    __device__ static void sc(const uint8_t*, int, float& a0, float& a1, float& m0, float& m1) { a0 = a1 = 1.f; m0 = m1 = 0.f; }
};
using FF16 = FHalf16<false>;
using FBF16 = FHalf16<true>;

// Power-of-two scale s that brings a row whose largest |x| is mx into [2^14, 2^15) (f16's largest
// finite value is 65504 ~ 2^16), and its inverse. Multiplying by a power of two is exact, so a row
// keeps all its f16 precision whatever its magnitude: rows of 1e6 no longer overflow to inf and rows
// of 1e-6 no longer sink into f16 subnormals. mx = 0 / inf / NaN: s = 1 (nothing to gain, inf stays inf).
__device__ __forceinline__ void pow2_scale(float mx, float& s, float& inv) {
    const int eb = (__float_as_int(mx) >> 23) & 0xff;
    if (!(mx > 0.f) || eb == 255) { s = inv = 1.f; return; }
    const int e = max(eb, 1) - 127;                  // mx < 2^(e+1) (subnormals: e = -126)
    const int se = min(max(14 - e, -126), 126);      // mx * 2^se < 2^15; both 2^se and 2^-se normal floats
    s = __int_as_float((127 + se) << 23);
    inv = __int_as_float((127 - se) << 23);
}

// full decode of one part: quants plus the scales of its block
template <class F>
__device__ __forceinline__ void dec(const uint8_t* b, int p, float* q, float& a0, float& a1, float& m0, float& m1) {
    F::qv(b, p, q);
    F::sc(b, p, a0, a1, m0, m1);
}

// The 8 weights (a*q + m) of global part gp of one row, and the columns they sit at: w[0..3] at
// c0..c0+3, w[4..7] at c1..c1+3. What embed_<fmt> and dequant_h_<fmt> write, as float or f16.
template <class F>
__device__ __forceinline__ void part_weights(const uint8_t* row, int gp, float* w, int& c0, int& c1) {
    const int blk = gp / F::NP, p = gp % F::NP;
    float q[8], a0, a1, m0, m1;
    int o0, o1;
    F::offs(p, o0, o1);
    dec<F>(row + (long long)blk * F::TS, p, q, a0, a1, m0, m1);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        w[j] = fmaf(a0, q[j], m0);
        w[4 + j] = fmaf(a1, q[4 + j], m1);
    }
    c0 = blk * F::QK + o0;
    c1 = blk * F::QK + o1;
}

}  // namespace oq
