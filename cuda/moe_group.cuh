// The grouped MoE GEMMs' row tiles (quant_matmul.cu's gemm_moe_*, mma_i8.cu's gemm_i8_moe_*), from the
// int32 workspace moe_group writes:
//   off[E+1]   first slot of each expert in perm (off[E] = number of routed slots)
//   perm[S]    slot indices (t*top_k + j) sorted by expert
//   te[Y], tr[Y]  row tile y of the grouped GEMM covers expert te[y] (-1: unused tile, the block exits)
//              and its perm positions off[te]+tr .. +BM
#pragma once

struct MoeGroup {
    const int* ws;      // nullptr: plain (dense) GEMM
    int top_k, E, Y, x_per_slot;
    long long expert_stride;
};

// Row tile blockIdx.y of T tokens' slots: false for an unused tile (the grid is sized by an upper
// bound; the whole block leaves). Otherwise W and bias (n outputs an expert) move to the tile's
// expert, and each of its BM rows gets its input row (the slot's own with x_per_slot, else its
// token's) and output row (the slot; -1 for both past the tile's slots). The caller syncs before
// reading xrow / yrow.
template <int BM, int THREADS, class WPtr, class BPtr>  // the callers' __restrict__ pointers
__device__ __forceinline__ bool moe_tile(const MoeGroup& mg, int T, int n, WPtr& W, BPtr& bias, int* xrow, int* yrow) {
    const int S = T * mg.top_k;
    const int* off = mg.ws;
    const int* perm = off + mg.E + 1;
    const int* te = perm + S;
    const int* tr = te + mg.Y;
    const int e = te[blockIdx.y];
    if (e < 0) return false;
    const int beg = off[e] + tr[blockIdx.y];
    const int cnt = min(BM, off[e + 1] - beg);
    W += e * mg.expert_stride;
    if (bias) bias += (long long)e * n;
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        const int s = r < cnt ? perm[beg + r] : -1;
        xrow[r] = s < 0 ? -1 : mg.x_per_slot ? s : s / mg.top_k;
        yrow[r] = s;
    }
    return true;
}
