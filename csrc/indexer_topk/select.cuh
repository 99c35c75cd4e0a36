// CTA-wide selection over 64-bit candidate keys, shared by the threshold and select stages of the
// prefill indexer_topk. Device-only, torch-free.
//
// NOTES:
// - Keys are distinct by construction (candidate_key puts the key index in the low word), so
//   "the k largest" is a set without ties and a threshold T with #{key >= T} == k describes it.
// - kth_largest_bound is an MSB-first radix select with 8-bit digits that stops as soon as the
//   digit's bin is taken whole: the answer is then the bin's prefix with zero low bits. Random
//   scores stop after 3-4 digits (sign and exponent, then mantissa bits); ties in the score reach
//   the index word.
// - Histogram adds are aggregated per warp with match.any: scores crowd a few bins of the top
//   digits, where plain shared atomics from 32 lanes on one address serialise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/numeric.h"
#include "indexcache/warp.h"

namespace indexcache {
namespace indexer_topk {

__device__ __forceinline__ uint64_t candidate_key(float score, uint32_t key) {
  return (uint64_t(topk_order_key(score)) << 32) | uint32_t(~key);
}

__device__ __forceinline__ uint32_t candidate_index(uint64_t candidate) {
  return ~uint32_t(candidate);
}

constexpr int kDigitBins = 256;

struct RadixScratch {
  uint32_t hist[kDigitBins];
  uint64_t prefix;
  uint32_t k_rem;
  uint32_t bin_count;
};

__device__ __forceinline__ uint64_t shfl_xor_u64(uint64_t v, int mask) {
  const uint32_t lo = __shfl_xor_sync(0xFFFFFFFFu, uint32_t(v), mask);
  const uint32_t hi = __shfl_xor_sync(0xFFFFFFFFu, uint32_t(v >> 32), mask);
  return (uint64_t(hi) << 32) | lo;
}

struct CommonBits {
  unsigned long long all_and, all_or;
};

// Whole CTA (returns after a barrier): keys[i] = key_at(i) for i < n, and the bits they all
// share: returns `top`, one above the highest bit in which they differ (0 when they do not), and
// leaves those shared bits in c.all_or, so that kth_largest_bound(..., c.all_or, top) skips the
// digits above.
template <int kThreads, class KeyAt>
__device__ int stage_keys(int n, KeyAt key_at, uint64_t* keys, CommonBits& c) {
  if (threadIdx.x == 0) {
    c.all_and = ~0ull;
    c.all_or = 0;
  }
  __syncthreads();
  uint64_t all_and = ~uint64_t(0), all_or = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const uint64_t key = key_at(i);
    keys[i] = key;
    all_and &= key;
    all_or |= key;
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    all_and &= shfl_xor_u64(all_and, d);
    all_or |= shfl_xor_u64(all_or, d);
  }
  if (lane_id() == 0) {
    atomicAnd(&c.all_and, all_and);
    atomicOr(&c.all_or, all_or);
  }
  __syncthreads();
  const uint64_t differ = c.all_and ^ c.all_or;
  return n > 1 && differ != 0 ? 64 - __clzll(differ) : 0;
}

// Whole CTA (kThreads threads; returns after a barrier): T with #{i < n : key_at(i) >= T} == rank
// for 1 <= rank <= n distinct keys whose bits at and above `top` all equal those of `prefix`
// (top = 64: nothing known). key_at is called several times per index.
template <int kThreads, class KeyAt>
__device__ uint64_t kth_largest_bound(int n, uint32_t rank, KeyAt key_at, RadixScratch& s,
                                      uint64_t prefix = 0, int top = 64) {
  const int tid = threadIdx.x, lane = lane_id();
  prefix = top < 64 ? prefix & (~uint64_t(0) << top) : 0;
  uint32_t k_rem = rank;
  while (top > 0) {
    const int width = min(8, top), shift = top - width;
    for (int b = tid; b < kDigitBins; b += kThreads) s.hist[b] = 0;
    __syncthreads();
    const uint64_t high = top == 64 ? 0 : ~uint64_t(0) << top;
    // Whole warps iterate together (match.any needs the converged warp).
    for (int i0 = tid - lane; i0 < n; i0 += kThreads) {
      const int i = i0 + lane;
      const bool in = i < n;
      const uint64_t key = in ? key_at(i) : 0;
      const bool counted = in && (key & high) == prefix;
      const uint32_t bin = counted ? uint32_t(key >> shift) & ((1u << width) - 1) : kDigitBins;
      const uint32_t same = __match_any_sync(0xFFFFFFFFu, bin);
      if (counted && lane == __ffs(same) - 1) atomicAdd(&s.hist[bin], __popc(same));
    }
    __syncthreads();
    if (tid < kWarpSize) {
      // Lane l holds bins 255 - 8 l - j (j < 8): lane 0 the top ones.
      uint32_t c[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = s.hist[kDigitBins - 1 - 8 * lane - j];
        sum += c[j];
      }
      const uint32_t incl = warp_inclusive_sum(sum);
      const uint32_t reach = __ballot_sync(0xFFFFFFFFu, incl >= k_rem);
      if (lane == __ffs(reach) - 1) {
        uint32_t above = incl - sum;
        int j = 0;
        while (above + c[j] < k_rem) above += c[j++];
        s.prefix = prefix | (uint64_t(kDigitBins - 1 - 8 * lane - j) << shift);
        s.k_rem = k_rem - above;
        s.bin_count = c[j];
      }
    }
    __syncthreads();
    prefix = s.prefix;
    k_rem = s.k_rem;
    const uint32_t bin_count = s.bin_count;
    top = shift;
    // The next digit's writes to s come after its first barrier, which every thread passes only
    // after these reads.
    if (bin_count == k_rem) break;
  }
  __syncthreads();
  return prefix;
}


// Whole CTA: sorts keys[0, n) descending in place, n a power of two (bitonic network; returns
// after a barrier). Exchanges between elements less than 64 apart run in registers: a warp holds
// 64 consecutive elements, two per lane, and trades with shuffles; only the longer strides go
// through shared memory, one barrier each.
template <int kThreads>
__device__ void sort_descending(uint64_t* keys, int n) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize;
  // Blocks of `size` with (e & size) == 0 descend; the last merge (size == n) is one such block.
  auto in_registers = [&](int size_from, int size_to) {
    for (int chunk = warp; chunk * 64 < n; chunk += kWarps) {
      const int e0 = chunk * 64 + 2 * lane;
      uint64_t v0 = e0 < n ? keys[e0] : 0, v1 = e0 + 1 < n ? keys[e0 + 1] : 0;
      for (int size = size_from; size <= size_to; size *= 2) {
        const bool descending = (e0 & size) == 0;  // e0 and e0 + 1 share it: size >= 2
        for (int stride = min(size / 2, 32); stride >= 1; stride /= 2) {
          if (stride == 1) {
            const uint64_t hi = v0 > v1 ? v0 : v1, lo = v0 > v1 ? v1 : v0;
            v0 = descending ? hi : lo;
            v1 = descending ? lo : hi;
          } else {
            const uint64_t o0 = shfl_xor_u64(v0, stride / 2), o1 = shfl_xor_u64(v1, stride / 2);
            const bool keep_max = ((e0 & stride) == 0) == descending;
            v0 = keep_max ? (v0 > o0 ? v0 : o0) : (v0 > o0 ? o0 : v0);
            v1 = keep_max ? (v1 > o1 ? v1 : o1) : (v1 > o1 ? o1 : v1);
          }
        }
      }
      if (e0 < n) keys[e0] = v0;
      if (e0 + 1 < n) keys[e0 + 1] = v1;
    }
    __syncthreads();
  };
  if (n < 2) return;
  in_registers(2, min(n, 64));
  for (int size = 128; size <= n; size *= 2) {
    for (int stride = size / 2; stride >= 64; stride /= 2) {
      for (int i = threadIdx.x; i < n / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a < b) == ((lo & size) == 0)) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
    in_registers(size, size);
  }
}

}  // namespace indexer_topk
}  // namespace indexcache
