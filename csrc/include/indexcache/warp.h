// Warp-level helpers shared by kernels. Device-only, torch-free.
#pragma once

#include <cstdint>

namespace indexcache {

constexpr int kWarpSize = 32;

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }

// Inclusive prefix sum over the lanes of a full warp.
__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t x) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const uint32_t y = __shfl_up_sync(0xFFFFFFFFu, x, offset);
    if (lane_id() >= offset) x += y;
  }
  return x;
}

// Max over groups of `kGroup` consecutive lanes (a power of two <= 32); every lane of a group
// gets the group's value.
template <int kGroup>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  }
  return v;
}

}  // namespace indexcache
