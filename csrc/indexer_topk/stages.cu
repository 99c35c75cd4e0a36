// The small stages of the prefill indexer_topk (stages.h): the sampled keys, the thresholds from
// the sampled scores, and the final selection among each row's candidates.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "indexcache/numeric.h"
#include "indexer_topk/select.cuh"
#include "indexer_topk/stages.h"

namespace indexcache {
namespace indexer_topk {
namespace {

constexpr int kRowThreads = 256;

__device__ __forceinline__ void clamped(int32_t begin, int32_t end, int64_t n, int64_t& b,
                                        int64_t& e) {
  b = min(max(int64_t(begin), int64_t(0)), n);
  e = min(max(int64_t(end), b), n);
}

__global__ void sample_keys_kernel(const SampleKeysParams p) {
  const int64_t ns = sampled_keys(p.N);
  const int64_t words = p.D / 16;  // uint4 per key row
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  if (tid == 0) *p.failed = 0;
  for (int64_t i = tid; i < ns * words; i += threads) {
    const int64_t j = i / words, w = i % words;
    reinterpret_cast<uint4*>(p.k_sample)[i] =
        reinterpret_cast<const uint4*>(p.k)[j * kSampleStride * words + w];
  }
  for (int64_t j = tid; j < ns; j += threads) p.k_scale_sample[j] = p.k_scale[j * kSampleStride];
  for (int64_t t = tid; t < p.S; t += threads) {
    int64_t b, e;
    clamped(p.ks[t], p.ke[t], p.N, b, e);
    p.ks_sample[t] = static_cast<int32_t>(sampled_keys(b));
    p.ke_sample[t] = static_cast<int32_t>(sampled_keys(e));
  }
}

// Sampled windows up to this many keys are staged in shared memory (N <= 128 K), longer ones are
// read from global memory (L2) once per radix digit.
constexpr int kThresholdStagedKeys = 4096;

__global__ void __launch_bounds__(kRowThreads) threshold_kernel(const ThresholdParams p) {
  __shared__ RadixScratch scratch;
  __shared__ CommonBits common;
  __shared__ uint64_t staged[kThresholdStagedKeys];
  const int64_t r = blockIdx.x;
  int64_t begin, end;
  clamped(p.ks[r], p.ke[r], p.N, begin, end);
  const int64_t sb = p.ks_sample[r], ws = p.ke_sample[r] - sb, w = end - begin;
  uint64_t threshold = 0;  // every visible key
  if (ws > 0) {
    // The sampled keys are ~ws / w of the window's: the top k of the window hold ~lambda of them.
    // A threshold at rank lambda + margin sqrt(lambda) of the sample keeps >= k keys of the window
    // unless the sample is that many standard deviations unlucky (the select stage checks).
    const float lambda = float(p.k) * float(ws) / float(w);
    const float rank = ceilf(lambda + kSampleMargin * sqrtf(lambda)) + 2.0f;
    if (rank <= float(ws)) {
      const float* row = p.sample_scores + r * p.Ns + sb;
      auto sampled = [&](int i) {
        return candidate_key(row[i], static_cast<uint32_t>((sb + i) * kSampleStride));
      };
      const int n = static_cast<int>(ws);
      if (n <= kThresholdStagedKeys) {
        const int top = stage_keys<kRowThreads>(n, sampled, staged, common);
        threshold = kth_largest_bound<kRowThreads>(
            n, static_cast<uint32_t>(rank), [&](int i) { return staged[i]; }, scratch,
            common.all_or, top);
      } else {
        threshold =
            kth_largest_bound<kRowThreads>(n, static_cast<uint32_t>(rank), sampled, scratch);
      }
    }
  }
  if (threadIdx.x == 0) {
    p.thresholds[r] = threshold;
    p.counts[r] = 0;
  }
}

constexpr int kSelectThreads = 512;

struct SelectSmem {
  uint64_t keys[kCandidateCap];
  uint64_t chosen[kMaxTopk];
  RadixScratch radix;
  CommonBits common;
  uint32_t chosen_count;
  uint32_t warp_sums[kSelectThreads / kWarpSize];
};

// Keys of a window that the unsorted output can mark in a bitmap over `chosen`.
constexpr int64_t kBitmapKeys = int64_t{kMaxTopk} * 64;

// Whole CTA (barriers inside): out[0, m) = begin + the set bits of bits[0, words) in ascending
// order. Each thread takes a contiguous run of words and writes from its prefix count.
__device__ void emit_bitmap(SelectSmem& s, const uint32_t* bits, int words, int64_t begin,
                            int32_t* out) {
  const int tid = threadIdx.x, lane = lane_id(), warp = tid / kWarpSize;
  const int per = (words + kSelectThreads - 1) / kSelectThreads;
  const int w0 = min(words, tid * per), w1 = min(words, w0 + per);
  uint32_t mine = 0;
  for (int w = w0; w < w1; ++w) mine += __popc(bits[w]);
  const uint32_t incl = warp_inclusive_sum(mine);
  if (lane == kWarpSize - 1) s.warp_sums[warp] = incl;
  __syncthreads();
  uint32_t at = incl - mine;
  for (int i = 0; i < warp; ++i) at += s.warp_sums[i];
  for (int w = w0; w < w1; ++w) {
    for (uint32_t b = bits[w]; b != 0; b &= b - 1) {
      out[at++] = static_cast<int32_t>(begin + 32 * int64_t(w) + __ffs(b) - 1);
    }
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SelectSmem& s = *reinterpret_cast<SelectSmem*>(smem_raw);
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = lane_id();
  const int n = p.counts[r];
  const uint64_t threshold = p.thresholds[r];
  if (n > kCandidateCap || (threshold != 0 && n < p.k)) {
    if (tid == 0) *p.failed = 1;
    return;
  }
  if (tid == 0) s.chosen_count = 0;
  const uint64_t* row = p.candidates + r * kCandidateCap;
  const int top = stage_keys<kSelectThreads>(n, [&](int i) { return row[i]; }, s.keys, s.common);
  const int m = min(n, p.k);
  // The radix select starts below the highest bit in which the candidates differ.
  const uint64_t bound =
      n > p.k ? kth_largest_bound<kSelectThreads>(
                    n, uint32_t(p.k), [&](int i) { return s.keys[i]; }, s.radix, s.common.all_or,
                    top)
              : 0;
  int32_t* out = p.out + r * p.out_row_stride;
  for (int i = m + tid; i < p.k; i += kSelectThreads) out[i] = -1;
  int64_t begin, end;
  clamped(p.ks[r], p.ke[r], p.N, begin, end);
  if (!p.sorted && end - begin <= kBitmapKeys) {
    // Ascending key order without a sort: the chosen keys marked in a bitmap of the window.
    auto* bits = reinterpret_cast<uint32_t*>(s.chosen);
    const int words = static_cast<int>((end - begin + 31) / 32);
    for (int w = tid; w < words; w += kSelectThreads) bits[w] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kSelectThreads) {
      if (s.keys[i] >= bound) {
        const uint32_t at = candidate_index(s.keys[i]) - static_cast<uint32_t>(begin);
        atomicOr(&bits[at / 32], 1u << (at % 32));
      }
    }
    __syncthreads();
    emit_bitmap(s, bits, words, begin, out);
    return;
  }
  // Sorted output: the chosen keys in descending order. Unsorted output beyond the bitmap's
  // reach: the complemented indices, sorted descending.
  for (int i0 = tid - lane; i0 < n; i0 += kSelectThreads) {
    const int i = i0 + lane;
    const uint64_t key = i < n ? s.keys[i] : 0;
    const bool take = i < n && key >= bound;
    const uint32_t ballot = __ballot_sync(0xFFFFFFFFu, take);
    uint32_t base = 0;
    if (lane == 0 && ballot != 0) base = atomicAdd(&s.chosen_count, __popc(ballot));
    base = __shfl_sync(0xFFFFFFFFu, base, 0);
    if (take) {
      s.chosen[base + __popc(ballot & ((1u << lane) - 1))] = p.sorted ? key : uint32_t(key);
    }
  }
  int padded = 1;
  while (padded < m) padded *= 2;
  for (int i = m + tid; i < padded; i += kSelectThreads) s.chosen[i] = 0;
  __syncthreads();
  sort_descending<kSelectThreads>(s.chosen, padded);
  for (int i = tid; i < m; i += kSelectThreads) {
    out[i] = static_cast<int32_t>(candidate_index(s.chosen[i]));
  }
}

}  // namespace

cudaError_t sample_keys(const SampleKeysParams& p, cudaStream_t stream) {
  const int64_t work = sampled_keys(p.N) * (p.D / 16) + p.S;
  const int blocks = static_cast<int>(std::min<int64_t>(1024, (work + 255) / 256));
  sample_keys_kernel<<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t thresholds(const ThresholdParams& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  threshold_kernel<<<static_cast<unsigned>(p.R), kRowThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t select(const SelectParams& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  constexpr size_t kSmem = sizeof(SelectSmem);
  cudaError_t e = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kSmem));
  if (e != cudaSuccess) return e;
  select_kernel<<<static_cast<unsigned>(p.R), kSelectThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace indexer_topk
}  // namespace indexcache
