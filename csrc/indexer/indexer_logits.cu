// Lightning-indexer scores, ragged prefill form, on SM90 FP8 tensor cores:
// I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h, :] . k[s, :]) for s in [ks[t], ke[t]),
// -inf elsewhere in the row. Building blocks and the design rationale: indexer_sm90.cuh, the
// schedule, producer and tile scoring it shares with indexer_topk's candidates: indexer_ragged.cuh.
//
// NOTES:
// - Every output element is written exactly once: a tile writes its columns below N; the columns
//   of a query group's rows outside its tiles ([0, lo) and [lo + 256 * tiles, N)) are filled with
//   -inf by the CTA that owns the group in a strided pass, so no row needs a host-side length.
// - Offsets into out are 64-bit.
// - Measured on the development H100 (S = 4096, N = 65536, causal-tail windows, median of 20):
//   H = 64, D = 128: 1002 TFLOP/s (925 sustained in a long back-to-back loop; same-run fp8 mm
//   ceiling 1400); H = 32, D = 128: 867; H = 64, D = 64: 648 with the split halves below.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "indexcache/params.h"
#include "indexer/indexer_ragged.cuh"
#include "ops/backends.h"

namespace indexcache {
namespace {

using namespace indexer_sm90;

template <int kHeads, int kHeadDim>
__global__ void __launch_bounds__(Config<kHeads, kHeadDim, 1>::kThreads, 1)
    indexer_logits_kernel(const IndexerLogitsParams p, const __grid_constant__ CUtensorMap tmap_q,
                          const __grid_constant__ CUtensorMap tmap_k) {
  if (p.run_if != nullptr && *p.run_if == 0) return;
  using C = Config<kHeads, kHeadDim, 1>;
  extern __shared__ uint8_t smem_raw[];
  const SmemLayout<C> smem(smem_raw);
  if (threadIdx.x == 0) smem.init_barriers();

  const int num_groups = num_query_groups<C>(p);
  const TileRange range = ragged_range<C>(p, smem.scratch);

  if (threadIdx.x >= C::kMathThreads) {
    // ---------------- producer warpgroup: one lane drives TMA ----------------
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegisters>();
    if (threadIdx.x == C::kMathThreads) produce_ragged<C>(p, range, smem, &tmap_q, &tmap_k);
  } else {
    // ---------------- math warpgroups ----------------
    cutlass::arch::warpgroup_reg_alloc<C::kMathRegisters>();
    const int ctid = threadIdx.x;
    const LanePlace lp(ctid % 128);
    constexpr float kNegInf = -INFINITY;

    // -inf outside the tiles of the query groups this CTA owns for filling.
    for (int group = blockIdx.x; group < num_groups; group += gridDim.x) {
      const GroupKeys keys = group_keys<C>(p, group);
      const int64_t head_end = keys.tiles > 0 ? keys.lo : p.N;
      const int64_t tail_begin =
          keys.tiles > 0 ? cmin<int64_t>(p.N, int64_t(keys.lo) + int64_t(keys.tiles) * C::kTileKeys)
                         : p.N;
      for (int i = 0; i < C::kQueriesPerGroup; ++i) {
        const int64_t t = int64_t(group) * C::kQueriesPerGroup + i;
        if (t >= p.S) break;
        float* row = p.out + t * p.out_row_stride;
        for (int64_t s = ctid; s < head_end; s += C::kMathThreads) row[s] = kNegInf;
        for (int64_t s = tail_begin + ctid; s < p.N; s += C::kMathThreads) row[s] = kNegInf;
      }
    }

    const int n_keys = static_cast<int>(p.N);
    float acc[C::kAccum];
    consume_ragged<C>(
        p, range, smem, lp, acc, [](const LaneGroup<C>&) {},
        [&](const LaneGroup<C>& lg, int, int key, const float (&score)[C::kQueriesPerLane]) {
          if (key < n_keys) {
#pragma unroll
            for (int g = 0; g < C::kQueriesPerLane; ++g) {
              if (lg.query[g] >= 0) {
                const bool visible = key >= lg.win[g].begin && key < lg.win[g].end;
                p.out[int64_t(lg.query[g]) * p.out_row_stride + key] =
                    visible ? score[g] : kNegInf;
              }
            }
          }
        },
        [](const LaneGroup<C>&) {});
  }
}

template <int kHeads, int kHeadDim>
cudaError_t launch(const IndexerLogitsParams& p, cudaStream_t stream) {
  using C = Config<kHeads, kHeadDim, 1>;
  const int64_t max_tiles = int64_t{num_query_groups<C>(p)} * ceil_div<int64_t>(p.N, C::kTileKeys);
  return launch_ragged<C>(indexer_logits_kernel<kHeads, kHeadDim>, p, p, max_tiles, stream);
}

}  // namespace

namespace cuda {

cudaError_t indexer_logits(const IndexerLogitsParams& p, cudaStream_t stream) {
  if (p.S == 0 || p.N == 0) return cudaSuccess;
  return indexer_sm90::dispatch_heads_and_dim(p.H, p.D, [&](auto heads, auto head_dim) {
    return launch<decltype(heads)::value, decltype(head_dim)::value>(p, stream);
  });
}

}  // namespace cuda
}  // namespace indexcache
