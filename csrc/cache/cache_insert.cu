// Cache writers: quantise-and-insert of indexer keys into the paged FP8 indexer cache, and of MLA
// latent rows into the paged bf16 or FP8 (656-byte) MLA cache.
//
// NOTES:
// - Memory-bound and tiny (one row per token per layer): one warp per token, every lane moving a
//   contiguous slice, so each warp reads and writes whole 32-byte sectors.
// - Quantisation goes through numeric.h, the same scale and rounding as the CPU path, so the GPU
//   writes byte-identical caches.
// - Slots outside [0, pages * 64) are skipped: the op cannot validate device data without a host
//   synchronisation, and a stray slot must never become an out-of-bounds write.
#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/numeric.h"
#include "indexcache/params.h"
#include "indexcache/warp.h"
#include "ops/backends.h"

namespace indexcache {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ bool slot_in_cache(int64_t slot, int64_t num_pages) {
  return slot >= 0 && slot < num_pages * kPageSize;
}

// ---- indexer keys: D e4m3 bytes per token + one fp32 scale, in DeepGEMM's page layout ----

template <int kHeadDim>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    indexer_k_cache_insert_kernel(const IndexerKCacheInsertParams p) {
  constexpr int kPerLane = kHeadDim / kWarpSize;  // 4 for D = 128, 2 for D = 64
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (token >= p.T) return;
  const int64_t slot = p.slot_mapping[token];
  if (!slot_in_cache(slot, p.num_pages)) return;

  float x[kPerLane];
  const uint16_t* src = p.k + token * kHeadDim + lane * kPerLane;
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    x[i] = bf16_to_float(src[i]);
    amax = fmaxf(amax, fabsf(x[i]));
  }
  amax = group_max<kWarpSize>(amax);
  const float scale = e4m3_quant_scale(amax, p.pow2_scale);

  const int64_t page = slot / kPageSize, row = slot % kPageSize;
  uint8_t* page_base = p.kv_cache + page * kPageSize * (kHeadDim + 4);
  uint8_t* dst = page_base + row * kHeadDim + lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dst[i] = float_to_e4m3(x[i] / scale);
  if (lane == 0) {
    reinterpret_cast<float*>(page_base + kPageSize * kHeadDim)[row] = scale;
  }
}

// ---- MLA rows: 512 latent + 64 rope, bf16 (1152 B) or FP8 (656 B) ----

constexpr int kLatentPerLane = kMlaDimLatent / kWarpSize;           // 16
constexpr int kLanesPerScaleBlock = kMlaFp8ScaleBlock / kLatentPerLane;  // 8

__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    mla_kv_cache_insert_kernel(const MlaKvCacheInsertParams p) {
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (token >= p.T) return;
  const int64_t slot = p.slot_mapping[token];
  if (!slot_in_cache(slot, p.num_pages)) return;

  const uint16_t* latent = p.kv_c + token * p.kv_c_row_stride + lane * kLatentPerLane;
  const uint16_t* rope = p.k_pe + token * p.k_pe_row_stride;
  const int row_bytes = p.fp8_cache ? kMlaFp8RowBytes : kMlaDimQK * 2;
  uint8_t* dst_row = p.kv_cache + slot * row_bytes;

  if (!p.fp8_cache) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(dst_row);
#pragma unroll
    for (int i = 0; i < kLatentPerLane; ++i) dst[lane * kLatentPerLane + i] = latent[i];
    for (int i = lane; i < kMlaDimRope; i += kWarpSize) dst[kMlaDimLatent + i] = rope[i];
    return;
  }

  float x[kLatentPerLane];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kLatentPerLane; ++i) {
    x[i] = bf16_to_float(latent[i]);
    amax = fmaxf(amax, fabsf(x[i]));
  }
  amax = group_max<kLanesPerScaleBlock>(amax);
  const float scale = e4m3_quant_scale(amax, p.pow2_scale);
  alignas(16) uint8_t q[kLatentPerLane];
#pragma unroll
  for (int i = 0; i < kLatentPerLane; ++i) q[i] = float_to_e4m3(x[i] / scale);
  *reinterpret_cast<uint4*>(dst_row + lane * kLatentPerLane) = *reinterpret_cast<const uint4*>(q);
  if (lane % kLanesPerScaleBlock == 0) {
    reinterpret_cast<float*>(dst_row + kMlaDimLatent)[lane / kLanesPerScaleBlock] = scale;
  }
  uint16_t* dst_rope = reinterpret_cast<uint16_t*>(dst_row + kMlaDimLatent +
                                                   (kMlaDimLatent / kMlaFp8ScaleBlock) * 4);
  for (int i = lane; i < kMlaDimRope; i += kWarpSize) dst_rope[i] = rope[i];
}

unsigned blocks_for(int64_t tokens) {
  return static_cast<unsigned>((tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

namespace cuda {

cudaError_t indexer_k_cache_insert(const IndexerKCacheInsertParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const dim3 grid(blocks_for(p.T)), block(kWarpsPerBlock * kWarpSize);
  if (p.D == 128) {
    indexer_k_cache_insert_kernel<128><<<grid, block, 0, stream>>>(p);
  } else {
    indexer_k_cache_insert_kernel<64><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t mla_kv_cache_insert(const MlaKvCacheInsertParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  mla_kv_cache_insert_kernel<<<blocks_for(p.T), kWarpsPerBlock * kWarpSize, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace indexcache
