// Lightning-indexer scores, ragged prefill form, on SM90 FP8 tensor cores:
// I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h, :] . k[s, :]) for s in [ks[t], ke[t]),
// -inf elsewhere in the row. Building blocks and the design rationale: indexer_sm90.cuh.
//
// NOTES:
// - Work item = a group of 128 / H consecutive queries (one wgmma N = 128); its keys are the union
//   of the group's windows, from its smallest start (rounded down to 16 keys, 64-byte aligned
//   stores) on, cut into 256-key tiles. Tiles wholly outside the union are never loaded.
// - Producer warp: Q group (16 KB) into a 2-deep ring, key tiles (32 KB) into a kKVStages-deep
//   ring, by TMA; out-of-range rows (last keys, last queries) arrive as zeros. Math warpgroup w
//   multiplies keys [64 w, 64 w + 64) of each tile, folds relu * weight over heads in registers,
//   scales by k_scale and writes the window's scores, -inf for the tile's other columns.
// - Every output element is written exactly once: a tile writes its columns below N; the columns
//   of a query group's rows outside its tiles ([0, lo) and [lo + 256 * tiles, N)) are filled with
//   -inf by the CTA that owns the group in a strided pass, so no row needs a host-side length.
// - Windows are clamped to [0, N]; end <= start is empty. Offsets into out are 64-bit.
// - Measured on the development H100 (S = 4096, N = 65536, causal-tail windows, median of 20):
//   H = 64, D = 128: 1002 TFLOP/s (925 sustained in a long back-to-back loop; same-run fp8 mm
//   ceiling 1400); H = 32, D = 128: 867; H = 64, D = 64: 648 with the split halves below.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "indexcache/params.h"
#include "indexer/indexer_sm90.cuh"
#include "ops/backends.h"

namespace indexcache {
namespace {

using namespace indexer_sm90;

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

template <int kHeads, int kHeadDim>
__global__ void __launch_bounds__(Config<kHeads, kHeadDim, 1>::kThreads, 1)
    indexer_logits_kernel(const IndexerLogitsParams p, const __grid_constant__ CUtensorMap tmap_q,
                          const __grid_constant__ CUtensorMap tmap_k) {
  using C = Config<kHeads, kHeadDim, 1>;
  extern __shared__ uint8_t smem_raw[];
  const SmemLayout<C> smem(smem_raw);
  if (threadIdx.x == 0) smem.init_barriers();

  const int num_groups = static_cast<int>(ceil_div<int64_t>(p.S, C::kQueriesPerGroup));
  const TileRange range = balanced_range<C::kThreads>(
      num_groups, [&](int64_t g) -> int64_t { return group_keys<C>(p, g).tiles; }, smem.scratch);

  if (threadIdx.x >= C::kMathThreads) {
    // ---------------- producer warpgroup: one lane drives TMA ----------------
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegisters>();
    if (threadIdx.x == C::kMathThreads) {
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
          cute::SM90_TMA_LOAD_2D::copy(&tmap_q, &smem.full_q[qr.stage], kTmaCacheHint,
                                       smem.q + qr.stage * C::kQStageBytes, 0,
                                       group * C::kMmaN);
          for (int t = first; t < first + take; ++t) {
            const Ring<C::kKVStages> kr(kv_iter++);
            Barrier::wait(&smem.empty_kv[kr.stage], kr.phase ^ 1);
            Barrier::arrive_and_expect_tx(&smem.full_kv[kr.stage], C::kTileBytes);
            cute::SM90_TMA_LOAD_2D::copy(&tmap_k, &smem.full_kv[kr.stage], kTmaCacheHint,
                                         smem.kv + kr.stage * C::kTileBytes, 0,
                                         keys.lo + t * C::kTileKeys);
          }
          left -= take;
        }
        first = 0;
        ++group;
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
    cutlass::arch::warpgroup_reg_alloc<C::kMathRegisters>();
    const int ctid = threadIdx.x;
    const int wg = ctid / 128;
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

    const uint32_t q_smem = smem_addr(smem.q);
    const uint32_t kv_smem = smem_addr(smem.kv) + wg * C::kSubTileBytes;
    const int n_keys = static_cast<int>(p.N);
    float acc[C::kAccum];
    float w[C::kAccum / 2];
    int q_iter = 0, kv_iter = 0;
    int group = static_cast<int>(range.item), first = static_cast<int>(range.first_tile);
    int left = static_cast<int>(range.count);
    while (left > 0) {
      const GroupKeys keys = group_keys<C>(p, group);
      const int take = min(keys.tiles - first, left);
      if (take > 0) {
        // The lane's queries 2g + b1 of the group (-1: past S) and their windows.
        int query[C::kQueriesPerLane];
        Window win[C::kQueriesPerLane];
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) {
          const int t = group * C::kQueriesPerGroup + 2 * g + lp.b1;
          query[g] = t < p.S ? t : -1;
          win[g] = t < p.S ? clamped_window(p, t) : Window{0, 0};
        }
        load_weights<C>(w, lp.quad, [&](int q) -> const float* {
          const int64_t t = int64_t(group) * C::kQueriesPerGroup + q;
          return t < p.S ? p.weights + t * kHeads : nullptr;
        });

        const Ring<C::kQStages> qr(q_iter++);
        Barrier::wait(&smem.full_q[qr.stage], qr.phase);
        const uint32_t q_group = q_smem + qr.stage * C::kQStageBytes;

        for (int t = first; t < first + take; ++t) {
          const int key = keys.lo + t * C::kTileKeys + wg * C::kMmaM + lp.row;
          const float key_scale = key < n_keys ? __ldg(p.k_scale + key) : 0.0f;
          const Ring<C::kKVStages> kr(kv_iter++);
          Barrier::wait(&smem.full_kv[kr.stage], kr.phase);
          float score[C::kQueriesPerLane];
          if constexpr (kSplitHalves<kHeadDim>) {
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
          if (key < n_keys) {
#pragma unroll
            for (int g = 0; g < C::kQueriesPerLane; ++g) {
              if (query[g] >= 0) {
                const bool visible = key >= win[g].begin && key < win[g].end;
                p.out[int64_t(query[g]) * p.out_row_stride + key] =
                    visible ? score[g] * key_scale : kNegInf;
              }
            }
          }
        }
        Barrier::arrive(&smem.empty_q[qr.stage]);
        left -= take;
      }
      first = 0;
      ++group;
    }
  }
}

template <int kHeads, int kHeadDim>
cudaError_t launch(const IndexerLogitsParams& p, cudaStream_t stream) {
  using C = Config<kHeads, kHeadDim, 1>;
  CUtensorMap tmap_q, tmap_k;
  {
    const uint64_t dims[2] = {uint64_t(kHeadDim), uint64_t(p.S) * kHeads};
    const uint64_t strides[1] = {uint64_t(kHeadDim)};
    const uint32_t box[2] = {uint32_t(kHeadDim), uint32_t(C::kMmaN)};
    const cudaError_t e = encode_rows_map(&tmap_q, p.q, 2, dims, strides, box, kHeadDim);
    if (e != cudaSuccess) return e;
  }
  {
    const uint64_t dims[2] = {uint64_t(kHeadDim), uint64_t(p.N)};
    const uint64_t strides[1] = {uint64_t(kHeadDim)};
    const uint32_t box[2] = {uint32_t(kHeadDim), uint32_t(C::kTileKeys)};
    const cudaError_t e = encode_rows_map(&tmap_k, p.k, 2, dims, strides, box, kHeadDim);
    if (e != cudaSuccess) return e;
  }
  int sms = 0;
  cudaError_t e = current_device_sms(&sms);
  if (e != cudaSuccess) return e;
  const int64_t groups = ceil_div<int64_t>(p.S, C::kQueriesPerGroup);
  const int64_t max_tiles = groups * ceil_div<int64_t>(p.N, C::kTileKeys);
  const int grid = static_cast<int>(cmax<int64_t>(1, cmin<int64_t>(sms, max_tiles)));

  auto kernel = indexer_logits_kernel<kHeads, kHeadDim>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, tmap_q, tmap_k);
  return cudaGetLastError();
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
