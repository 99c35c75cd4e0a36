// The ragged (prefill) form of the SM90 indexer, shared by its two kernels: indexer_logits.cu
// writes every score, indexer_topk/candidates.cu keeps the keys at or above each query's
// threshold. Both walk the same persistent schedule of query groups and 256-key tiles, load them
// with the same producer, and score a tile with the same MMA + head fold; only what happens to
// the scores differs. Torch-free.
//
// NOTES:
// - Work item = a group of 128 / H consecutive queries (one wgmma N = 128); its keys are the union
//   of the group's windows, from its smallest start (rounded down to 16 keys, 64-byte aligned
//   stores) on, cut into 256-key tiles. Tiles wholly outside the union are never loaded.
// - Producer warp: Q group (16 KB) into a 2-deep ring, key tiles (32 KB) into a kKVStages-deep
//   ring, by TMA; out-of-range rows (last keys, last queries) arrive as zeros. Math warpgroup w
//   multiplies keys [64 w, 64 w + 64) of each tile, folds relu * weight over heads in registers
//   and scales by k_scale (consume_ragged); the caller's on_tile consumes the scores.
// - Windows are clamped to [0, N]; end <= start is empty.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/params.h"
#include "indexer/indexer_sm90.cuh"

namespace indexcache {
namespace indexer_sm90 {

constexpr int kStoreAlign = 16;  // group start rounded down to this many keys

// Whether a tile is issued as two n64 wgmma halves whose first half's heads are folded while the
// second runs (mma_tile_issue_halves), instead of one n128 wgmma. It pays where the MMA is short
// against the fold (D = 64: two k-steps per tile; measured +8 %, 601 -> 648 TFLOP/s at S = 4096,
// N = 65536, H = 64) and not at D = 128, where the extra smem read of the keys cancels it (1002 vs
// 921-1008 TFLOP/s, within run-to-run noise; H = 32: 867 vs 832).
template <int kHeadDim>
constexpr bool kSplitHalves = kHeadDim == 64;

struct Window {
  int begin;
  int end;  // begin <= end; empty when equal
};

__device__ __forceinline__ Window clamped_window(const IndexerLogitsParams& p, int64_t t) {
  const int n = static_cast<int>(p.N);
  const int begin = min(max(__ldg(p.ks + t), 0), n);
  const int end = min(max(__ldg(p.ke + t), begin), n);
  return {begin, end};
}

// Keys of one query group: tiles [lo + 256 i, lo + 256 (i + 1)) for i < tiles.
struct GroupKeys {
  int lo;
  int tiles;
};

template <class C>
__device__ __forceinline__ GroupKeys group_keys(const IndexerLogitsParams& p, int64_t group) {
  int lo = INT32_MAX, hi = 0;
#pragma unroll
  for (int i = 0; i < C::kQueriesPerGroup; ++i) {
    const int64_t t = group * C::kQueriesPerGroup + i;
    if (t < p.S) {
      const Window w = clamped_window(p, t);
      if (w.begin < w.end) {
        lo = min(lo, w.begin);
        hi = max(hi, w.end);
      }
    }
  }
  if (lo >= hi) return {0, 0};
  lo -= lo % kStoreAlign;
  return {lo, ceil_div(hi - lo, C::kTileKeys)};
}

template <class C>
__host__ __device__ __forceinline__ int num_query_groups(const IndexerLogitsParams& p) {
  return static_cast<int>(ceil_div<int64_t>(p.S, C::kQueriesPerGroup));
}

// The CTA's share of the schedule (every thread calls it: it synchronises the block).
template <class C>
__device__ __forceinline__ TileRange ragged_range(const IndexerLogitsParams& p,
                                                  int64_t* scratch) {
  return balanced_range<C::kThreads>(
      num_query_groups<C>(p), [&](int64_t g) -> int64_t { return group_keys<C>(p, g).tiles; },
      scratch);
}

// The producer warpgroup's one lane: for every group of the range its Q rows, then its tiles.
template <class C>
__device__ __forceinline__ void produce_ragged(const IndexerLogitsParams& p, const TileRange& range,
                                               const SmemLayout<C>& smem,
                                               const CUtensorMap* tmap_q,
                                               const CUtensorMap* tmap_k) {
  int q_iter = 0, kv_iter = 0;
  int group = static_cast<int>(range.item), first = static_cast<int>(range.first_tile);
  int left = static_cast<int>(range.count);
  while (left > 0) {
    const GroupKeys keys = group_keys<C>(p, group);
    const int take = min(keys.tiles - first, left);
    if (take > 0) {
      const Ring<C::kQStages> qr(q_iter++);
      Barrier::wait(&smem.empty_q[qr.stage], qr.phase ^ 1);
      Barrier::arrive_and_expect_tx(&smem.full_q[qr.stage], C::kQGroupBytes);
      cute::SM90_TMA_LOAD_2D::copy(tmap_q, &smem.full_q[qr.stage], kTmaCacheHint,
                                   smem.q + qr.stage * C::kQStageBytes, 0, group * C::kMmaN);
      for (int t = first; t < first + take; ++t) {
        const Ring<C::kKVStages> kr(kv_iter++);
        Barrier::wait(&smem.empty_kv[kr.stage], kr.phase ^ 1);
        Barrier::arrive_and_expect_tx(&smem.full_kv[kr.stage], C::kTileBytes);
        cute::SM90_TMA_LOAD_2D::copy(tmap_k, &smem.full_kv[kr.stage], kTmaCacheHint,
                                     smem.kv + kr.stage * C::kTileBytes, 0,
                                     keys.lo + t * C::kTileKeys);
      }
      left -= take;
    }
    first = 0;
    ++group;
  }
}

// One query group as a math lane sees it: the group, its key tiles, and the lane's queries
// 2g + b1 (-1 past S) with their windows.
template <class C>
struct LaneGroup {
  int64_t group;
  GroupKeys keys;
  int query[C::kQueriesPerLane];
  Window win[C::kQueriesPerLane];
};

// The math warpgroups' walk over the range: on_group(LaneGroup) before a group's first tile,
// on_tile(LaneGroup, tile index, key, score[kQueriesPerLane]) after each tile with the lane's
// scores of key row `key`, k_scale applied (key may be >= N in the last tile: scale 0), and
// on_group_end(LaneGroup) after its last tile. The key stage is released before on_tile runs.
template <class C, class OnGroup, class OnTile, class OnGroupEnd>
__device__ __forceinline__ void consume_ragged(const IndexerLogitsParams& p, const TileRange& range,
                                               const SmemLayout<C>& smem, const LanePlace& lp,
                                               float (&acc)[C::kAccum], OnGroup on_group,
                                               OnTile on_tile, OnGroupEnd on_group_end) {
  const int wg = threadIdx.x / 128;
  const uint32_t q_smem = smem_addr(smem.q);
  const uint32_t kv_smem = smem_addr(smem.kv) + wg * C::kSubTileBytes;
  const int n_keys = static_cast<int>(p.N);
  float w[C::kAccum / 2];
  int q_iter = 0, kv_iter = 0;
  int group = static_cast<int>(range.item), first = static_cast<int>(range.first_tile);
  int left = static_cast<int>(range.count);
  while (left > 0) {
    LaneGroup<C> lg;
    lg.group = group;
    lg.keys = group_keys<C>(p, group);
    const int take = min(lg.keys.tiles - first, left);
    if (take > 0) {
#pragma unroll
      for (int g = 0; g < C::kQueriesPerLane; ++g) {
        const int t = group * C::kQueriesPerGroup + 2 * g + lp.b1;
        lg.query[g] = t < p.S ? t : -1;
        lg.win[g] = t < p.S ? clamped_window(p, t) : Window{0, 0};
      }
      load_weights<C>(w, lp.quad, [&](int q) -> const float* {
        const int64_t t = int64_t(group) * C::kQueriesPerGroup + q;
        return t < p.S ? p.weights + t * C::kHeads : nullptr;
      });
      on_group(lg);

      const Ring<C::kQStages> qr(q_iter++);
      Barrier::wait(&smem.full_q[qr.stage], qr.phase);
      const uint32_t q_group = q_smem + qr.stage * C::kQStageBytes;

      for (int t = first; t < first + take; ++t) {
        const int key = lg.keys.lo + t * C::kTileKeys + wg * C::kMmaM + lp.row;
        const float key_scale = key < n_keys ? __ldg(p.k_scale + key) : 0.0f;
        const Ring<C::kKVStages> kr(kv_iter++);
        Barrier::wait(&smem.full_kv[kr.stage], kr.phase);
        float score[C::kQueriesPerLane];
        if constexpr (kSplitHalves<C::kHeadDim>) {
          // Fold the first 64 columns while the tensor cores finish the other 64.
          PairSums<C> part;
          mma_tile_issue_halves<C>(kv_smem + kr.stage * C::kTileBytes, q_group, acc);
          mma_wait_half<0>(acc);
          head_partial<C, 0, 8>(acc, w, part);
          mma_wait_half<1>(acc);
          Barrier::arrive(&smem.empty_kv[kr.stage]);
          head_partial<C, 8, 16>(acc, w, part);
          quad_reduce_scatter<C>(part, lp, score);
        } else {
          mma_tile<C>(kv_smem + kr.stage * C::kTileBytes, q_group, acc);
          Barrier::arrive(&smem.empty_kv[kr.stage]);
          head_reduce<C>(acc, w, lp, score);
        }
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) score[g] *= key_scale;
        on_tile(lg, t, key, score);
      }
      Barrier::arrive(&smem.empty_q[qr.stage]);
      on_group_end(lg);
      left -= take;
    }
    first = 0;
    ++group;
  }
}

// Tensor maps of q (rows of D bytes, boxes of one 128-row group) and k (boxes of one 256-key tile).
template <class C>
inline cudaError_t encode_ragged_maps(const IndexerLogitsParams& p, CUtensorMap* tmap_q,
                                      CUtensorMap* tmap_k) {
  {
    const uint64_t dims[2] = {uint64_t(C::kHeadDim), uint64_t(p.S) * C::kHeads};
    const uint64_t strides[1] = {uint64_t(C::kHeadDim)};
    const uint32_t box[2] = {uint32_t(C::kHeadDim), uint32_t(C::kMmaN)};
    const cudaError_t e = encode_rows_map(tmap_q, p.q, 2, dims, strides, box, C::kHeadDim);
    if (e != cudaSuccess) return e;
  }
  const uint64_t dims[2] = {uint64_t(C::kHeadDim), uint64_t(p.N)};
  const uint64_t strides[1] = {uint64_t(C::kHeadDim)};
  const uint32_t box[2] = {uint32_t(C::kHeadDim), uint32_t(C::kTileKeys)};
  return encode_rows_map(tmap_k, p.k, 2, dims, strides, box, C::kHeadDim);
}

// Launches `kernel(params, tmap_q, tmap_k)` on a persistent grid of min(SMs, max_ctas) CTAs of
// C's size and shared memory.
template <class C, class Kernel, class Params>
inline cudaError_t launch_ragged(Kernel kernel, const Params& params, const IndexerLogitsParams& p,
                                 int64_t max_ctas, cudaStream_t stream) {
  CUtensorMap tmap_q, tmap_k;
  cudaError_t e = encode_ragged_maps<C>(p, &tmap_q, &tmap_k);
  if (e != cudaSuccess) return e;
  int sms = 0;
  e = current_device_sms(&sms);
  if (e != cudaSuccess) return e;
  const int grid = static_cast<int>(cmax<int64_t>(1, cmin<int64_t>(sms, max_ctas)));
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(params, tmap_q, tmap_k);
  return cudaGetLastError();
}

}  // namespace indexer_sm90
}  // namespace indexcache
