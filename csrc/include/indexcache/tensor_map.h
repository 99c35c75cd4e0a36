// Host-side TMA tensor maps for the launchers. Torch-free; encoding a map is a host computation
// (no device work, no synchronisation), so launchers may build one per call, also under CUDA-graph
// capture (the map is a kernel parameter, captured by value).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace indexcache {

using EncodeTiledFn = decltype(&cuTensorMapEncodeTiled);

// The driver's tensor-map encoder, fetched through the runtime so the extension needs no libcuda
// link; nullptr if the driver does not provide it.
inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return EncodeTiledFn{nullptr};
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// Tiled uint8 tensor map whose boxes are `swizzle_bytes` wide (128: 128B swizzle, 64: 64B), the
// swizzle the wgmma descriptors of the consuming kernel expect. dims[0] is the bytes of a row;
// strides are the byte strides of dims 1..rank-1. Out-of-bounds box elements are filled with
// zeros (a box at row -1 lands as a zero row).
inline cudaError_t encode_rows_map(CUtensorMap* map, const void* base, int rank,
                                   const uint64_t* dims, const uint64_t* strides,
                                   const uint32_t* box, int swizzle_bytes) {
  const EncodeTiledFn fn = encode_tiled_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, static_cast<cuuint32_t>(rank),
                        const_cast<void*>(base), reinterpret_cast<const cuuint64_t*>(dims),
                        reinterpret_cast<const cuuint64_t*>(strides),
                        reinterpret_cast<const cuuint32_t*>(box), element_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE,
                        swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                             : CU_TENSOR_MAP_SWIZZLE_64B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace indexcache
