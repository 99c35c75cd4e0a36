// Top-k over row windows of a materialised fp32 logits matrix (k <= 2048): exact radix selection
// over topk_order_key, deterministic under ties. The device pieces are topk_radix.cuh's.
//
// NOTES:
// - One launch, no workspace, whatever the shape: each row is selected by Q CTAs forming one
//   thread-block cluster (Q = 1: a plain CTA per row). The CTAs of a cluster each stream a
//   contiguous part of the row and combine their histograms and counts through distributed
//   shared memory (cluster barriers; the hardware co-schedules a cluster, so they cannot
//   deadlock). The sorted selection is gathered into rank 0's shared memory and sorted there.
// - plan_cluster() picks Q: many rows (R >= one CTA per SM slot) take one CTA each; fewer rows
//   are spread over clusters of up to 16 CTAs as long as every CTA keeps >= kChunkMin columns:
//   up to one row per two SMs, at one CTA per SM, the largest cluster of which the device holds
//   all R at once (occupancy queries); more rows, the grid fitting one wave at two CTAs per SM
//   (clusters of up to 16, 8 where the device cannot place 16).
// - Two builds of the kernel: two CTAs per SM (128 registers) for grids of more CTAs than SMs,
//   one (no spills) for grids that fit one per SM: one 128K row 21.7 -> 19.2 us on the H200.
// - INDEXCACHE_TOPK_SPLIT=<G> forces Q to the largest power of two <= min(G, max cluster size)
//   (1 = one CTA per row): a testing and tuning override; unset, plan_cluster() decides.
// - Flow of one CTA: stream (topk_radix.cuh) -> cluster barrier -> digit-0 search over the
//   cluster's summed histogram (the stream's own starting search when no warp had a second
//   batch, in the one-CTA-per-SM build) -> per refinement digit: narrow the lists and
//   histogram the next digit, barrier, search -> count each warp's items above / at the
//   threshold, barrier, prefix over (rank, warp) -> emit. Every branch between barriers
//   depends on cluster-wide values only.
// - Measured on H100 (issue 5, CUDA-graph replay, k = 2048, unsorted unless said): 4096 x 128K
//   1304 us = 1.65 TB/s with the sampled starting bound (1582 us = 1.36 TB/s with proven bounds
//   only); one 128K row 22.9 us (the sample is the whole row there: unchanged). Nsight Compute at
//   4096 x 128K: 1115 warp instructions per 1024-item batch (1604 before), issue slots 43 % busy,
//   stalls: fixed-latency dependencies 28 %, global loads 20 %, shared memory 12 %, barriers 10 %.
//   Half the batch's instructions are the appends (~53 per 4-item step, run in 95 % of steps);
//   a leaner store path with one page test per lane-step (not per item) measured the same
//   (1338 us), so the next lever is not the instruction count alone: more loads in flight per
//   SM (the register double buffer is 64 of the 128 registers; TMA bulk copies into shared
//   memory would free them) and fewer barriers per row.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "indexcache/device.h"
#include "indexcache/params.h"
#include "ops/backends.h"
#include "topk/topk_radix.cuh"

namespace indexcache {
namespace {

using namespace topk_radix;

constexpr int64_t kChunkMin = 4096;  // columns per CTA, at least, when a row is spread
constexpr int kCtasPerSm = 2;        // the many-rows build: sizeof(Smem) <= ~113 KB, 128 registers
constexpr size_t kSmemBytes = sizeof(Smem);
static_assert(kSmemBytes * kCtasPerSm <= 227 * 1024, "two CTAs per SM");

__device__ __forceinline__ Smem& shared_state() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return *reinterpret_cast<Smem*>(smem_raw);
}

// CTA (row r = blockIdx.x / Q, rank q): slots [q * per_cta, (q + 1) * per_cta) of row r's window.
// Built twice: kMinCtas = kCtasPerSm (128 registers, spills ~300 B) for grids of many CTAs, and
// kMinCtas = 1 (no spills) for grids that fit one CTA per SM, where nothing shares the SM and the
// spill reloads sit on the latency path of a row that is read once (one 128K row over a cluster).
template <int kMinCtas>
__global__ void __launch_bounds__(kThreads, kMinCtas) topk_kernel(const TopkParams p, int Q) {
  if (p.run_if != nullptr && *p.run_if == 0) return;  // every CTA alike: no cluster barrier waits
  Smem& s = shared_state();
  const ClusterView cv{Q, Q > 1 ? int(cg::this_cluster().block_rank()) : 0};
  const int64_t r = blockIdx.x / Q;
  const int warp = warp_id(), lane = lane_id();
  const uint32_t k = uint32_t(p.k);

  // Device windows are not validated (that would need a host sync): clamp as the CPU does.
  int64_t begin = p.row_starts ? p.row_starts[r] : 0;
  int64_t end = p.row_ends ? p.row_ends[r] : p.C;
  begin = std::min(std::max<int64_t>(begin, 0), p.C);
  end = std::min(std::max(end, begin), p.C);
  const int64_t n_valid = end - begin;

  Slice sl;
  sl.row = p.logits + r * p.logits_row_stride;
  sl.begin = int(begin);
  sl.end = int(end);
  sl.first = int(begin) - int((reinterpret_cast<uintptr_t>(sl.row + begin) / sizeof(float)) % 4);
  const int slots = end > begin ? int((end - sl.first + 3) / 4) : 0;
  sl.full_lo = sl.first < sl.begin ? 1 : 0;
  sl.full_hi = int((end - sl.first) / 4);
  const int per_cta = (slots + Q - 1) / Q;
  const int cta_lo = std::min(cv.q * per_cta, slots);
  const int cta_hi = std::min(cta_lo + per_cta, slots);
  const int per_warp = (cta_hi - cta_lo + kWarps - 1) / kWarps;
  sl.lo = std::min(cta_lo + warp * per_warp, cta_hi);
  sl.hi = std::min(sl.lo + per_warp, cta_hi);

  // A window of <= k items is taken whole, read straight from the slices.
  Threshold th{n_valid <= int64_t(k), 0, 0};
  WarpList L{0, 0, th.all, 0};  // the stream sets up its own
  uint32_t k_rem = 0;
  if (!th.all) {
    // The stream's first batches (every warp's, over the cluster) sample the window; unless they
    // cover it, the starting bound is estimated from them with 25 % to spare (stream_slice).
    const int64_t sample = std::min(n_valid, int64_t(Q) * kWarps * kBatchSlots * 4);
    const uint32_t k_sample =
        sample >= n_valid ? k
                          : uint32_t(std::min<int64_t>(
                                k, (int64_t(k) * sample * 5 / 4 + n_valid - 1) / n_valid));
    // The same answer in every CTA of the cluster: each decides alone whether to skip the
    // barrier of the digit-0 search. The first CTA's warps have the longest slices (per_cta
    // slots, the most any CTA has); the last CTA's may be shorter, and deciding by its own
    // (9e28ecd to 7ea51cd) let it skip a cluster barrier the others waited at: at a window one
    // float4 past one batch per warp the CTAs' barriers fell out of step
    // (test_one_batch_boundary_windows: cudaErrorInvalidAddressSpace, a DSMEM access to a CTA
    // that had left).
    if (threadIdx.x == 0) {
      s.one_batch = (per_cta + kWarps - 1) / kWarps <= kBatchSlots;
    }
    Found f;
    for (int attempt = 0;; ++attempt) {
      stream_slice(s, cv, sl, L, k, attempt == 0 ? k_sample : k);
      // A proven pass always answers; only an estimate above the k-th key is retried.
      if (digit0_search<kMinCtas == 1>(s, cv, k, f) || attempt > 0) break;
      cv.sync();  // every CTA is done reading this one's histogram
    }
    th.shift = kShift0;
    th.prefix = f.bin;
    k_rem = k - f.greater;
    uint32_t in_bin = f.count;
    int buf = 0;
    // Refine while the prefix bin holds more items than are still needed.
    while (th.shift > 0 && in_bin != k_rem) {
      const uint32_t next_shift = th.shift > 10 ? 10 : 0;
      const int bits = int(th.shift - next_shift);
      buf ^= 1;
      // Every CTA finished its search over this buffer (two levels ago) before the last barrier.
      for (int i = threadIdx.x; i < (1 << bits); i += kThreads) s.hist[buf][i] = 0;
      __syncthreads();
      uint32_t* hist = s.hist[buf];
      auto on_eq = [&](uint32_t key) {
        atomicAdd(&hist[(key >> next_shift) & ((1u << bits) - 1u)], 1u);
      };
      // Lists first, so that abandoned ones find the pages the others released.
      if (!L.global) refine_list(s, L, sl, th.shift, th.prefix, on_eq);
      __syncthreads();
      if (L.global) refine_list(s, L, sl, th.shift, th.prefix, on_eq);
      __syncthreads();
      sum_groups(s, buf, bits);
      cv.sync();
      find_in_cluster(s, cv, buf, bits, k_rem, false, f);
      th.prefix = (th.prefix << bits) | f.bin;
      th.shift = next_shift;
      k_rem -= f.greater;
      in_bin = f.count;
    }
  }

  // Each warp's items above / at the threshold, then their prefix over (rank, warp).
  uint32_t gt_count = 0, eq_count = 0;
  for_each_candidate_step(s, L, sl, [&](const uint32_t (&key)[4], const uint32_t (&)[4],
                                        uint32_t valid) {
    uint32_t gt, eq;
    th.classify(key, valid, gt, eq);
    gt_count += __popc(gt);
    eq_count += __popc(eq);
  });
  gt_count = __reduce_add_sync(kFullMask, gt_count);
  eq_count = __reduce_add_sync(kFullMask, eq_count);
  if (lane == 0) {
    s.warp_counts[warp] = static_cast<unsigned long long>(eq_count) << 32 | gt_count;
  }
  cv.sync();
  // The counts of the warps before this one, all DSMEM loads in flight at once: a loop of
  // dependent rounds kept the last rank of a 16-CTA cluster ~1 us behind the first.
  constexpr int kRounds = kMaxCluster * kWarps / kWarpSize;
  const int me = cv.q * kWarps + warp;
  unsigned long long before[kRounds];
#pragma unroll
  for (int j = 0; j < kRounds; ++j) {
    const int i = j * kWarpSize + lane;
    before[j] = i < me ? *cv.at(&s.warp_counts[i % kWarps], i / kWarps) : 0ull;
  }
  unsigned long long before_sum = 0;
#pragma unroll
  for (int j = 0; j < kRounds; ++j) before_sum += before[j];
  uint32_t gt_run = __reduce_add_sync(kFullMask, uint32_t(before_sum));
  uint32_t eq_run = __reduce_add_sync(kFullMask, uint32_t(before_sum >> 32));

  // Emit: position = items above before it + min(items at before it, k_rem).
  int32_t* out = p.out + r * p.out_row_stride;
  unsigned long long* sorted = cv.at(&s.sort[0], 0);
  for_each_candidate_step(s, L, sl, [&](const uint32_t (&key)[4], const uint32_t (&col)[4],
                                        uint32_t valid) {
    uint32_t gt, eq;
    th.classify(key, valid, gt, eq);
    const uint32_t packed = uint32_t(__popc(gt)) | uint32_t(__popc(eq)) << 16;
    const uint32_t incl = warp_inclusive_sum(packed);
    const uint32_t total = __shfl_sync(kFullMask, incl, kWarpSize - 1);
    uint32_t gt_before = gt_run + ((incl - packed) & 0xFFFFu);
    uint32_t eq_before = eq_run + ((incl - packed) >> 16);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool is_gt = (gt >> c) & 1u, is_eq = (eq >> c) & 1u;
      if (is_gt || (is_eq && eq_before < k_rem)) {
        const uint32_t pos = gt_before + std::min(eq_before, k_rem);
        if (p.sorted) {
          sorted[pos] = (static_cast<unsigned long long>(key[c]) << 32) | ~col[c];
        } else {
          out[pos] = int32_t(col[c]);
        }
      }
      gt_before += is_gt;
      eq_before += is_eq;
    }
    gt_run += total & 0xFFFFu;
    eq_run += total >> 16;
  });

  // k items were emitted at [0, k), or the whole window when it is shorter.
  const int count = th.all ? int(n_valid) : int(k);
  if (!p.sorted) {
    if (cv.q == 0) {
      for (int i = count + threadIdx.x; i < int(k); i += kThreads) out[i] = -1;
    }
    if (Q > 1) cv.sync();  // no CTA leaves while another may still read its counts
    return;
  }
  cv.sync();
  if (cv.q != 0) return;
  // Padding sorts last: a real entry's low word ~column is >= 2^31 > 0.
  for (int i = count + threadIdx.x; i < kMaxTopk; i += kThreads) s.sort[i] = 0;
  __syncthreads();
  unsigned long long v[kSortPer];
  bitonic_sort_desc(s.sort, v);
#pragma unroll
  for (int j = 0; j < kSortPer; ++j) {
    const int i = kSortPer * threadIdx.x + j;
    if (i < int(k)) out[i] = i < count ? int32_t(~uint32_t(v[j])) : -1;
  }
}

template <int kMinCtas>
cudaError_t set_attributes() {
  cudaError_t err = cudaFuncSetAttribute(topk_kernel<kMinCtas>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kSmemBytes));
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(topk_kernel<kMinCtas>,
                              cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
}

cudaLaunchConfig_t launch_config(int64_t ctas, int64_t Q, cudaLaunchAttribute* attr,
                                 cudaStream_t stream) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = unsigned(Q);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(ctas));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of Q (a power of two <= kMaxCluster) CTAs of build kMinCtas the device holds
// at once (0: it cannot place one; a cluster of 16 at one CTA per SM needs 16 SMs of one GPC).
// Asked once per device, build and Q (a host-side query, no synchronisation).
template <int kMinCtas>
int active_clusters(int device, int64_t Q) {
  constexpr int kSizes = 5;  // Q = 1, 2, 4, 8, 16
  static_assert(kMaxCluster == 1 << (kSizes - 1), "one cache slot per cluster size");
  static std::atomic<int> cache[64][kSizes];  // the answer + 1 (static storage: zero = unknown)
  int log_q = 0;
  while ((int64_t(1) << log_q) < Q) ++log_q;
  std::atomic<int>* slot = device >= 0 && device < 64 ? &cache[device][log_q] : nullptr;
  if (slot != nullptr) {
    if (const int known = slot->load(std::memory_order_relaxed); known > 0) return known - 1;
  }
  int clusters = 0;
  if (set_attributes<kMinCtas>() == cudaSuccess) {
    cudaLaunchAttribute attr{};
    const cudaLaunchConfig_t cfg = launch_config(Q, Q, &attr, nullptr);
    if (cudaOccupancyMaxActiveClusters(&clusters, topk_kernel<kMinCtas>, &cfg) != cudaSuccess) {
      clusters = 0;
    }
  }
  (void)cudaGetLastError();  // a refused query is an answer, not an error of this launch
  if (slot != nullptr) slot->store(clusters + 1, std::memory_order_relaxed);
  return clusters;
}

// Largest cluster the device can place with build kMinCtas's resources (16, else the portable 8).
template <int kMinCtas>
int max_cluster_size(int device) {
  return active_clusters<kMinCtas>(device, kMaxCluster) > 0 ? kMaxCluster : 8;
}

int64_t floor_pow2(int64_t x) {
  int64_t v = 1;
  while (v * 2 <= x) v *= 2;
  return v;
}

int64_t plan_cluster(const TopkParams& p, int device, int sms) {
  const int64_t max_q = max_cluster_size<kCtasPerSm>(device);
  if (const char* forced = std::getenv("INDEXCACHE_TOPK_SPLIT"); forced && *forced) {
    return floor_pow2(std::clamp<int64_t>(std::atoll(forced), 1, max_q));
  }
  // Few rows (at most one per two SMs): the build without spills at one CTA per SM, and the
  // largest cluster of which the device holds all R at once. On the H200 (2026-12-04, k = 2048,
  // rows of 131072): 64 rows 63.6 -> 40.7 us (Q = 4 over two CTAs per SM before, now Q = 2),
  // 8 rows 37.2 -> 22.3 us (Q = 16 placed in two waves before, now Q = 8); one row keeps Q = 16.
  // The largest power of two <= limit whose grid fits `ctas` and keeps >= kChunkMin columns per
  // CTA, while `placeable(Q)` holds.
  auto largest_q = [&](int64_t limit, int64_t ctas, auto placeable) {
    int64_t q = 1;
    while (q * 2 <= limit && p.R * q * 2 <= ctas && p.C >= q * 2 * kChunkMin && placeable(q * 2)) {
      q *= 2;
    }
    return q;
  };
  if (2 * p.R <= sms) {
    const int64_t q = largest_q(kMaxCluster, sms,
                                [&](int64_t n) { return active_clusters<1>(device, n) >= p.R; });
    if (q > 1) return q;
  }
  return largest_q(max_q, int64_t(kCtasPerSm) * sms, [](int64_t) { return true; });
}

constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // gridDim.x

template <int kMinCtas>
cudaError_t launch(const TopkParams& p, int64_t Q, cudaStream_t stream) {
  cudaError_t err = set_attributes<kMinCtas>();
  if (err != cudaSuccess) return err;
  if (Q == 1) {
    topk_kernel<kMinCtas><<<unsigned(p.R), kThreads, kSmemBytes, stream>>>(p, 1);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr{};
  const cudaLaunchConfig_t cfg = launch_config(p.R * Q, Q, &attr, stream);
  if ((err = cudaLaunchKernelEx(&cfg, topk_kernel<kMinCtas>, p, int(Q))) != cudaSuccess) {
    return err;
  }
  return cudaGetLastError();
}

}  // namespace

namespace cuda {

cudaError_t topk(const TopkParams& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  int device = 0, sms = 0;
  const cudaError_t err = current_device_sms(&sms, &device);
  if (err != cudaSuccess) return err;
  const int64_t Q = plan_cluster(p, device, sms);
  if (p.R * Q > kMaxBlocks) return cudaErrorInvalidConfiguration;
  // A grid that fits one CTA per SM takes the build without spills (if its clusters can be
  // placed: it needs twice the SMs per cluster).
  if (p.R * Q <= sms && (Q == 1 || max_cluster_size<1>(device) >= Q)) {
    return launch<1>(p, Q, stream);
  }
  return launch<kCtasPerSm>(p, Q, stream);
}

}  // namespace cuda
}  // namespace indexcache
