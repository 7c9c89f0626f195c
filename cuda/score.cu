// Prompt log-probs on the GPU: per scored prompt position, the log-prob of the next prompt token
// and the n_top most likely tokens, so only those few numbers (not a [n, V] row of logits) reach
// the host.
//
// prompt_logprobs: one CTA per scored position p (a row rows[p] of the step's logits [*, V]):
//   1. online max / sum-exp over the row (each thread its strided part, rescaling its sum when
//      its max grows), then block reductions: lse = M + log(sum exp(x - M));
//   2. out_lp[p] = x[targets[p]] - lse;
//   3. n_top arg-max passes, each over the elements strictly "below" the previous pick in the order
//      (value descending, index ascending): the same order, and the same lowest-index-first
//      rule for ties, as sample.cu's top logprobs.
// The raw logits are read as they are (no temperature, bias or mask): scoring describes the model.
#include "common.cuh"

#define SCORE_THREADS 1024

extern "C" __global__ void __launch_bounds__(SCORE_THREADS)
prompt_logprobs(const float* __restrict__ logits, int V, const int* __restrict__ rows,
                const int* __restrict__ targets, int n_top, float* __restrict__ out_lp,
                int* __restrict__ top_ids, float* __restrict__ top_lp) { pdl_enter();
    __shared__ float scratch[32];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float bc_v;
    __shared__ int bc_i;

    const int p = blockIdx.x;
    const float* x = logits + (size_t)rows[p] * V;

    float tm = -INFINITY, ts = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = x[i];
        if (v > tm) { ts = ts * __expf(tm - v) + 1.f; tm = v; }
        else ts += __expf(v - tm);
    }
    const float M = block_max(tm, scratch);
    const float Z = block_sum(tm == -INFINITY ? 0.f : ts * __expf(tm - M), scratch);
    const float lse = M + __logf(Z);
    if (threadIdx.x == 0) {
        const int t = targets[p];
        out_lp[p] = (t >= 0 && t < V) ? x[t] - lse : -INFINITY;
    }

    float lim_v = INFINITY;
    int lim_i = -1;
    for (int j = 0; j < n_top; ++j) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const float v = x[i];
            const bool below = v < lim_v || (v == lim_v && i > lim_i);
            if (below && (v > bv || (v == bv && i < bi))) { bv = v; bi = i; }
        }
        argmax_reduce(bv, bi, &bc_v, &bc_i, sv, si);
        lim_v = bc_v;
        lim_i = bc_i;
        if (threadIdx.x == 0) {
            top_ids[(size_t)p * n_top + j] = bc_i;
            top_lp[(size_t)p * n_top + j] = bc_v - lse;
        }
    }
}
