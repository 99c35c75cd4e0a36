// Host-side facts about the current CUDA device that the launchers size their grids with.
// Torch-free. Attribute queries only: no device synchronisation, safe during graph capture.
#pragma once

#include <cuda_runtime.h>

namespace indexcache {

// The current device's multiprocessor count (persistent grids, cluster and split plans), and its
// ordinal when `device` is given. An error is returned, never a guessed count.
inline cudaError_t current_device_sms(int* sms, int* device = nullptr) {
  int ordinal = 0;
  cudaError_t e = cudaGetDevice(&ordinal);
  if (e != cudaSuccess) return e;
  if (device != nullptr) *device = ordinal;
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, ordinal);
}

}  // namespace indexcache
