// Stage 4 of the prefill indexer_topk (stages.h): the indexer over every key of the chunk's rows,
// scored by indexer_logits' own device code (indexer_ragged.cuh: same schedule, producer, MMA and
// head fold, so the same bits), keeping each query's keys at or above its sampled threshold.
//
// NOTES:
// - Nothing of [S, N] is written: a math warp holds, per tile, 16 keys of each of the group's
//   queries (one score per lane and query pair). A key is kept when it is visible and its score
//   is >= the threshold key's score (the float the threshold's order key stands for): one float
//   compare, no order key per score. That keeps the ties of the threshold's score on both sides
//   of its index too, a superset of {candidate_key >= threshold} and still an upper set of the
//   row's order, so the select stage's exact count checks stay valid. A threshold whose order
//   key is 0 (no sampled threshold) keeps every visible key, NaN included; otherwise no NaN is
//   kept (a NaN ranks below every number).
// - Kept keys go to the warp's own staging list for their query in shared memory, at positions
//   from a ballot (no atomics). When one list may not take the next tile's 16, the warp flushes
//   all of its lists: one global atomicAdd per list on its row's count reserves the places (all
//   in flight together: one round trip), the warp copies them out. At ~5 % of keys kept, a
//   list of 64 fills in ~70 tiles, so the atomics' latency stays off the per-tile path.
// - A row's count keeps counting past kCandidateCap (only the first kCandidateCap land): the
//   select stage sees the overflow and leaves the row to the fallback.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "indexer/indexer_ragged.cuh"
#include "indexer_topk/select.cuh"
#include "indexer_topk/stages.h"

namespace indexcache {
namespace indexer_topk {
namespace {

using namespace indexer_sm90;

constexpr int kStagingPerWarp = 128;  // entries (8 bytes) per math warp, split over its queries
constexpr int kMathWarps = 16;
constexpr int kStagingBytes = kMathWarps * kStagingPerWarp * 8;

// indexer_logits' configuration with the staging lists beside the rings (the budget grows by
// their size, so the key stages stay as many).
template <int kHeads, int kHeadDim>
using CandidateConfig = Config<kHeads, kHeadDim, 1, kStagingBytes, 192 * 1024 + kStagingBytes>;

template <int kHeads, int kHeadDim>
__global__ void __launch_bounds__(CandidateConfig<kHeads, kHeadDim>::kThreads, 1)
    candidates_kernel(const CandidatesParams cp, const __grid_constant__ CUtensorMap tmap_q,
                      const __grid_constant__ CUtensorMap tmap_k) {
  using C = CandidateConfig<kHeads, kHeadDim>;
  static_assert(C::kMathThreads / 32 == kMathWarps, "staging lists per math warp");
  constexpr int kListLen = kStagingPerWarp / C::kQueriesPerGroup;  // 64 (H = 64), 32 (H = 32)
  constexpr int kFlushAbove = kListLen - 16;           // a tile adds <= 16 per list
  const IndexerLogitsParams& p = cp.scores;
  extern __shared__ uint8_t smem_raw[];
  const SmemLayout<C> smem(smem_raw);
  if (threadIdx.x == 0) smem.init_barriers();

  const TileRange range = ragged_range<C>(p, smem.scratch);

  if (threadIdx.x >= C::kMathThreads) {
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegisters>();
    if (threadIdx.x == C::kMathThreads) produce_ragged<C>(p, range, smem, &tmap_q, &tmap_k);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<C::kMathRegisters>();
  const LanePlace lp(threadIdx.x % 128);
  const int lane = threadIdx.x % 32;
  const uint32_t lanes_below = (1u << lane) - 1;
  // Lanes holding this lane's query pair 2g + b1 (lane bit 1 equal to its own).
  const uint32_t query_lanes = lp.b1 ? 0xCCCCCCCCu : 0x33333333u;
  uint64_t* staging =
      reinterpret_cast<uint64_t*>(smem.extra) + (threadIdx.x / 32) * kStagingPerWarp;

  // Per query pair g of the lane: the threshold as a float (a key is kept when its score is >=
  // it, which no NaN is), or every visible key (take_all, NaN included); and the entry count of
  // the lane's list of that query (the same in every lane of the query).
  float threshold[C::kQueriesPerLane];
  bool take_all[C::kQueriesPerLane];
  int listed[C::kQueriesPerLane] = {};
  uint64_t* list_of[C::kQueriesPerLane];
#pragma unroll
  for (int g = 0; g < C::kQueriesPerLane; ++g) list_of[g] = staging + (2 * g + lp.b1) * kListLen;

  // Whole warp: appends every list to its row's candidates. Lane j < kQueriesPerGroup reserves
  // the places of list j (query j of the group), all lists' reservations in flight at once.
  auto flush = [&](int64_t group) {
    __syncwarp();
    int n = 0;
#pragma unroll
    for (int g = 0; g < C::kQueriesPerLane; ++g) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int count = __shfl_sync(0xFFFFFFFFu, listed[g], 2 * b);  // lane 2b: query 2g + b
        if (lane == 2 * g + b) n = count;
      }
    }
    uint32_t base = 0;
    if (lane < C::kQueriesPerGroup && n > 0) {
      base = atomicAdd(reinterpret_cast<uint32_t*>(cp.counts + group * C::kQueriesPerGroup + lane),
                       n);
    }
#pragma unroll
    for (int list = 0; list < C::kQueriesPerGroup; ++list) {
      const int count = __shfl_sync(0xFFFFFFFFu, n, list);
      const uint32_t at = __shfl_sync(0xFFFFFFFFu, base, list);
      uint64_t* row = cp.candidates + (group * C::kQueriesPerGroup + list) * kCandidateCap;
      for (int i = lane; i < count; i += 32) {
        // Staged as (score bits, ~key): the order key is taken here, off the per-tile path.
        const uint64_t e = staging[list * kListLen + i];
        if (at + i < kCandidateCap) {
          row[at + i] = candidate_key(__uint_as_float(uint32_t(e >> 32)), ~uint32_t(e));
        }
      }
    }
#pragma unroll
    for (int g = 0; g < C::kQueriesPerLane; ++g) listed[g] = 0;
    __syncwarp();
  };

  float acc[C::kAccum];
  consume_ragged<C>(
      p, range, smem, lp, acc,
      [&](const LaneGroup<C>& lg) {
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) {
          // The threshold key's score: its order key turned back into the float (a query past S
          // has an empty window and never reads it).
          const uint32_t order = lg.query[g] >= 0 ? uint32_t(cp.thresholds[lg.query[g]] >> 32) : 0;
          take_all[g] = order == 0;
          threshold[g] = __uint_as_float(order & 0x80000000u ? order & 0x7FFFFFFFu : ~order);
        }
      },
      [&](const LaneGroup<C>& lg, int, int key, const float (&score)[C::kQueriesPerLane]) {
        bool over = false;
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) {
          const Window w = lg.win[g];
          const bool keep = uint32_t(key - w.begin) < uint32_t(w.end - w.begin) &&
                            (score[g] >= threshold[g] || take_all[g]);
          const uint32_t kept = __ballot_sync(0xFFFFFFFFu, keep) & query_lanes;
          if (keep) {
            list_of[g][listed[g] + __popc(kept & lanes_below)] =
                (uint64_t(__float_as_uint(score[g])) << 32) | uint32_t(~key);
          }
          listed[g] += __popc(kept);
          over |= listed[g] > kFlushAbove;
        }
        if (__any_sync(0xFFFFFFFFu, over)) flush(lg.group);
      },
      [&](const LaneGroup<C>& lg) { flush(lg.group); });
}

}  // namespace

cudaError_t candidates(const CandidatesParams& cp, cudaStream_t stream) {
  const IndexerLogitsParams& p = cp.scores;
  if (p.S == 0 || p.N == 0) return cudaSuccess;
  return dispatch_heads_and_dim(p.H, p.D, [&](auto heads, auto head_dim) {
    constexpr int H = decltype(heads)::value, D = decltype(head_dim)::value;
    using C = CandidateConfig<H, D>;
    const int64_t max_tiles =
        int64_t{num_query_groups<C>(p)} * ceil_div<int64_t>(p.N, C::kTileKeys);
    return launch_ragged<C>(candidates_kernel<H, D>, cp, p, max_tiles, stream);
  });
}

}  // namespace indexer_topk
}  // namespace indexcache
