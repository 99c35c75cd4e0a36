// Sparse MLA: the split-k schedule, its workspace, and the combine kernel shared by prefill and
// decode (see sparse_mla_sm90.cuh for the design).
//
// NOTES:
// - The schedule is a pure function of (rows, Hq, topk, SM count), so the op layer can size the
//   workspace with at::empty before the launch and a captured CUDA graph replays the same plan.
// - The combine reads each partial once (16 B per lane) and writes bf16 out + fp32 lse; splits
//   are merged in index order, so results are bitwise reproducible.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "sparse_mla/sparse_mla_sm90.cuh"

namespace indexcache {
namespace sparse_mla_sm90 {
namespace {

constexpr int kCombineWarps = 8;

__global__ void __launch_bounds__(kCombineWarps * 32)
    sparse_mla_combine_kernel(const __grid_constant__ Problem p) {
  const int64_t rows_heads = p.rows * p.Hq;
  const int64_t item = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= rows_heads) return;
  constexpr float kNegInf = -__builtin_huge_valf();

  float m = kNegInf;
  for (int s = 0; s < p.splits; ++s) m = fmaxf(m, p.lse_part[s * rows_heads + item]);
  uint16_t* out = p.out + item * kMlaDimLatent;
  if (m == kNegInf) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<uint2*>(out + 4 * lane + 128 * j) = make_uint2(0, 0);
    }
    if (lane == 0) p.lse[item] = kNegInf;
    return;
  }
  float acc[16] = {};
  float sum = 0.0f;
  for (int s = 0; s < p.splits; ++s) {
    const float w = expf(p.lse_part[s * rows_heads + item] - m);
    sum += w;
    if (w == 0.0f) continue;  // an empty split (lse -inf) holds zeros
    const float* src = p.o_part + (s * rows_heads + item) * kMlaDimLatent;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float4 v = *reinterpret_cast<const float4*>(src + 4 * lane + 128 * j);
      acc[4 * j + 0] = fmaf(w, v.x, acc[4 * j + 0]);
      acc[4 * j + 1] = fmaf(w, v.y, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(w, v.z, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(w, v.w, acc[4 * j + 3]);
    }
  }
  const float inv = 1.0f / sum;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    *reinterpret_cast<uint2*>(out + 4 * lane + 128 * j) =
        make_uint2(pack_bf16x2(acc[4 * j] * inv, acc[4 * j + 1] * inv),
                   pack_bf16x2(acc[4 * j + 2] * inv, acc[4 * j + 3] * inv));
  }
  if (lane == 0) p.lse[item] = m + logf(sum);
}

}  // namespace

SplitPlan plan_splits(int64_t rows, int Hq, int topk, int num_sms) {
  const int tiles = (topk + kBlockKeys - 1) / kBlockKeys;
  const int64_t ctas = rows * head_groups_of(Hq);
  if (ctas <= 0 || ctas >= num_sms || tiles < 2 * kMinTilesPerSplit) return {1, tiles};
  const int splits = std::min<int64_t>(num_sms / ctas, tiles / kMinTilesPerSplit);
  if (splits <= 1) return {1, tiles};
  // Whole tile pairs per split (the producer resolves a pair's indices at once, one tile per
  // buffer), but for the last.
  const int per_split = ((tiles + splits - 1) / splits + 1) & ~1;
  return {(tiles + per_split - 1) / per_split, per_split};  // no empty split
}

int64_t workspace_bytes(int64_t rows, int Hq, const SplitPlan& plan) {
  if (plan.splits <= 1) return 0;
  return int64_t(plan.splits) * rows * Hq * (kMlaDimLatent + 1) * int64_t(sizeof(float));
}

cudaError_t launch_combine(const Problem& prob, cudaStream_t stream) {
  const int64_t items = prob.rows * prob.Hq;
  const int64_t blocks = (items + kCombineWarps - 1) / kCombineWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  sparse_mla_combine_kernel<<<unsigned(blocks), kCombineWarps * 32, 0, stream>>>(prob);
  return cudaGetLastError();
}

}  // namespace sparse_mla_sm90

namespace cuda {

int64_t sparse_mla_workspace_bytes(int64_t queries, int Hq, int topk) {
  int sms = 0;
  // A failed query sizes no workspace; the launch then reports the same error.
  if (queries <= 0 || current_device_sms(&sms) != cudaSuccess) return 0;
  return sparse_mla_sm90::workspace_bytes(
      queries, Hq, sparse_mla_sm90::plan_splits(queries, Hq, topk, sms));
}

}  // namespace cuda
}  // namespace indexcache
