// Sparse MLA forward on sm_90a: the one mainloop behind sparse_mla_prefill (flat bf16 KV) and
// sparse_mla_decode (paged bf16 or FP8 cache), and the split-k combine. Torch-free; included by
// the .cu files of this folder only.
//
// NOTES:
// - Work unit (one CTA, 256 threads = 2 math warpgroups): one query row x one group of 64 heads x
//   one slice of its top-k. 64 heads is the M of a wgmma and the most a CTA can hold: the output
//   accumulator of 64 heads x 512 fp32 already takes half the register file (128 per thread), so
//   Hq = 128 runs as two CTAs per query (launched adjacently: the second gather of each KV row hits
//   L2), and Hq = 16 / 32 pad the M rows with zero queries that are never stored.
// - Per 64-key tile: warpgroup g computes S[:, 32g : 32g + 32] = Q K^T (64x32x576, both operands
//   in smem), the two exchange their row maxima through smem so that both use the same running
//   max, each writes its probabilities (bf16) into a shared 64x64 P tile, and each accumulates
//   O[:, 256g : 256g + 256] += P V over all 64 keys (64x256x64). So every gathered row is read from
//   global memory once per CTA and from smem once per warpgroup and GEMM.
// - No producer warps: the KV gather is cp.async (16 B; masked rows are zero-filled with
//   st.shared) issued by all 256 threads right after they issue the asynchronous S wgmma, and
//   double-buffered (Q 72 KB + 2 KV tiles 144 KB + P 8 KB = the whole 227 KB of smem). FP8 rows
//   (656 B) pass through registers half a tile at a time and are dequantised to bf16 into the
//   other buffer while the S and the P V wgmmas run (Fp8Half).
// - The KV tile is stored once, row-major [key][576] in 128-byte-swizzled 8x64 atoms; the same
//   bytes are the K-major B operand of Q K^T and the MN-major B operand of P V (V^T view), so
//   nothing is transposed. Shapes and fragment layouts are CuTe's (checked against the manual
//   swizzle formula used by the gather).
// - Index resolution runs two tiles ahead in warps 0-1 (one key per thread, a software pipeline
//   of index load -> block-table load -> row id), so dependent global loads never stall the tile
//   being computed. Each resolved row is also hinted into L2 (prefetch.global.L2) a tile before
//   its gather (measured within run-to-run noise at the headline prefill shape: the gather is
//   not latency-bound on HBM alone).
// - Masked keys (-1, out of [0, N), positions past the block table or pages outside the cache,
//   the tail past topk) become zero rows and -inf scores: nothing outside the tensors is ever
//   read, and 0 * garbage can never make a NaN.
// - Split-k (small batches): CTAs of one (query, head group) take disjoint tile ranges and write
//   normalised fp32 partial outputs + lse to a workspace the op layer allocates; a second kernel
//   merges them in a fixed order. The split count depends on shapes and the SM count only, so a
//   call is CUDA-graph capturable and bitwise reproducible.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "indexcache/device.h"
#include "indexcache/params.h"

namespace indexcache {
namespace sparse_mla_sm90 {

// ---- configuration -------------------------------------------------------------------------

constexpr int kHeadsPerCta = 64;     // wgmma M
constexpr int kBlockKeys = 64;       // keys per tile
constexpr int kKeysPerWg = kBlockKeys / 2;
constexpr int kVColsPerWg = kMlaDimLatent / 2;
constexpr int kThreads = 256;        // two math warpgroups
constexpr int kRowChunks = kMlaDimQK * 2 / 16;                      // 72 x 16 B per bf16 row
constexpr int kTileChunksPerThread = kBlockKeys * kRowChunks / kThreads;  // 18
static_assert(kBlockKeys * kRowChunks % kThreads == 0, "tile gather split");
constexpr int kMetaStages = 3;       // tiles i (mask), i + 1 (gather), i + 2 (being resolved)
constexpr int kMinTilesPerSplit = 2;

// FP8 row layout (params.h): 512 e4m3 | 4 fp32 scales | 64 bf16 rope.
constexpr int kFp8ScalesOffset = kMlaDimLatent;
constexpr int kFp8RopeOffset = kMlaFp8RowBytes - kMlaDimRope * 2;  // 528
static_assert(kMlaFp8RowBytes % 16 == 0 && kFp8RopeOffset % 16 == 0, "16-byte FP8 row chunks");

using bf16 = cutlass::bfloat16_t;

// smem tiles. One 64 x 576 tile is 9 column blocks of 64 (8 atoms of 8 rows x 128 B each):
// element (r, d) sits at (d / 64) * 4096 + r * 64 + (((d % 64) / 8) ^ (r % 8)) * 8 + d % 8.
using SmemLayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<bf16>{},
                                                 cute::Shape<cute::_64, cute::Int<kMlaDimQK>>{}));
using SmemLayoutK = SmemLayoutQ;  // (key, dim)
// The first 512 dims of a KV tile as the (dim, key) MN-major operand: the same bytes.
using SmemLayoutVt = decltype(cute::tile_to_shape(
    cute::GMMA::Layout_MN_SW128_Atom<bf16>{}, cute::Shape<cute::Int<kMlaDimLatent>, cute::_64>{},
    cute::Step<cute::_2, cute::_1>{}));
using SmemLayoutP = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<bf16>{},
                                                 cute::Shape<cute::_64, cute::_64>{}));

using TiledMmaS = decltype(cute::make_tiled_mma(
    cute::GMMA::ss_op_selector<bf16, bf16, float,
                               cute::Shape<cute::_64, cute::Int<kKeysPerWg>, cute::_64>,
                               cute::GMMA::Major::K, cute::GMMA::Major::K>()));
using TiledMmaO = decltype(cute::make_tiled_mma(
    cute::GMMA::ss_op_selector<bf16, bf16, float,
                               cute::Shape<cute::_64, cute::Int<kVColsPerWg>, cute::_64>,
                               cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

constexpr int kTileElems = kHeadsPerCta * kMlaDimQK;  // 36864

struct SharedStorage {
  uint16_t q[kTileElems];                // offset 0
  uint16_t kv[2][kTileElems];            // offset 73728 (72 KB), 1024-aligned
  uint16_t p[kHeadsPerCta * kBlockKeys];  // offset 221184, 1024-aligned
  int64_t meta[kMetaStages][kBlockKeys];  // row id of each key (-1: masked)
  uint32_t valid[kMetaStages][2];         // bit k of word g: key 32g + k is valid
  float row_stat[2][kHeadsPerCta];        // per-warpgroup row max, then row sum
};
static_assert(offsetof(SharedStorage, kv) % 1024 == 0 && offsetof(SharedStorage, p) % 1024 == 0,
              "swizzled tiles need 1024-byte alignment");
constexpr int kSmemBytes = int(sizeof(SharedStorage));
static_assert(kSmemBytes <= 232448, "over the 227 KB of smem an sm_90 block may opt into");

// Element offset of (row r, 16-byte chunk c) of a 64 x 576 swizzled tile (see SmemLayoutQ).
__device__ __forceinline__ uint32_t tile_chunk_offset(int r, int c) {
  return uint32_t((c >> 3) * 4096 + r * 64 + (((c & 7) ^ (r & 7)) << 3));
}

// ---- problem -------------------------------------------------------------------------------

enum class Mode { kPrefill, kDecodeBf16, kDecodeFp8 };

// Everything a CTA needs, for both ops. Query row `r` is prefill's s or decode's b * next_n + j.
struct Problem {
  const uint16_t* q;          // [rows, Hq, 576]
  const uint8_t* kv;          // prefill [N, 576] bf16; decode [num_pages * 64, row_bytes]
  const int32_t* indices;     // [rows, topk]
  const int32_t* block_table; // decode: [B, max_pages], row stride block_table_row_stride
  uint16_t* out;              // [rows, Hq, 512]
  float* lse;                 // [rows, Hq]
  float* o_part;              // splits > 1: [splits, rows, Hq, 512]
  float* lse_part;            // splits > 1: [splits, rows, Hq]
  int64_t rows;
  int64_t N;                  // prefill: KV rows
  int64_t num_pages;          // decode
  int64_t block_table_row_stride;
  int max_pages_per_seq;
  int next_n;
  int Hq;
  int head_groups;
  int topk;
  int splits;
  int tiles_per_split;
  float sm_scale;
};

// ---- small device helpers ------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src)
               : "memory");
}

__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v);

// A 16-byte chunk from global memory, or zeros (then no global address is formed at all: a masked
// row may point anywhere, and an empty KV has no valid address).
__device__ __forceinline__ void load_chunk_or_zero(uint32_t dst, const uint8_t* src, bool valid) {
  if (valid) {
    cp_async_16(dst, src);
  } else {
    st_shared_v4(dst, make_uint4(0, 0, 0, 0));
  }
}

// Pulls the 128-byte lines of [p, p + bytes) into L2 (a hint: no smem, no wait, no fault).
template <int kBytes>
__device__ __forceinline__ void prefetch_l2(const uint8_t* p) {
#pragma unroll
  for (int off = 0; off < kBytes + 127; off += 128) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + min(off, kBytes - 1)));
  }
}

__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float ld_nc_f32(const void* p) {
  float v;
  asm volatile("ld.global.nc.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Four e4m3 bytes (little-endian in `w`) times `scale` -> four bf16 in two words.
__device__ __forceinline__ uint2 dequant4(uint32_t w, float scale) {
  const __half2_raw lo_raw =
      __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w & 0xFFFFu), __NV_E4M3);
  const __half2_raw hi_raw = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w >> 16), __NV_E4M3);
  const float2 lo = __half22float2(__half2(lo_raw));
  const float2 hi = __half22float2(__half2(hi_raw));
  return make_uint2(pack_bf16x2(lo.x * scale, lo.y * scale),
                    pack_bf16x2(hi.x * scale, hi.y * scale));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  return v + __shfl_xor_sync(0xFFFFFFFFu, v, 2);
}

// ---- index resolution (one key per thread of warps 0-1) -----------------------------------

// Index (prefill: KV row; decode: position) of key `key` of query `row`; -1 past topk.
__device__ __forceinline__ int load_index(const Problem& p, int64_t row, int64_t key) {
  return key < p.topk ? __ldg(p.indices + row * p.topk + key) : -1;
}

// Decode: the block-table entry holding position `pos` (-1 when the position has none).
template <Mode kMode>
__device__ __forceinline__ int load_page(const Problem& p, int64_t row, int pos) {
  if constexpr (kMode == Mode::kPrefill) {
    return 0;
  } else {
    if (pos < 0 || pos / kPageSize >= p.max_pages_per_seq) return -1;
    const int64_t b = row / p.next_n;
    return __ldg(p.block_table + b * p.block_table_row_stride + pos / kPageSize);
  }
}

// Row id in p.kv (prefill: KV row; decode: page * 64 + pos % 64), or -1 when masked.
template <Mode kMode>
__device__ __forceinline__ int64_t resolve_row(const Problem& p, int index, int page) {
  if constexpr (kMode == Mode::kPrefill) {
    return index >= 0 && index < p.N ? int64_t(index) : -1;
  } else {
    if (index < 0 || page < 0 || page >= p.num_pages) return -1;
    return int64_t(page) * kPageSize + (index % kPageSize);
  }
}

// ---- gathers -------------------------------------------------------------------------------

// 64 bf16 rows of 576 (row r at src + rows[r] * row_bytes, zero rows where rows[r] < 0) into a
// swizzled tile, cp.async by all 256 threads.
__device__ __forceinline__ void gather_bf16_tile(uint32_t dst, const uint8_t* src,
                                                 int64_t row_bytes, const int64_t* rows, int tid) {
#pragma unroll 6
  for (int i = 0; i < kTileChunksPerThread; ++i) {
    const int e = tid + kThreads * i;
    const int r = e / kRowChunks;
    const int c = e - r * kRowChunks;
    const int64_t row = rows[r];
    load_chunk_or_zero(dst + 2 * tile_chunk_offset(r, c), src + row * row_bytes + c * 16, row >= 0);
  }
}

// FP8 rows pass through registers half a tile (rows 32 h .. 32 h + 31) at a time: half 0 of
// tile i + 1 is loaded during tile i - 1's P V and stored during tile i's S, half 1 loaded during
// tile i's S and stored during its P V (the tile loop below), so a half's latency hides behind a
// GEMM and the softmax or the loop barrier while only 21 registers ride beside the 128
// accumulators (a whole tile staged took 41 and spilled). Thread (warp w, lane l) holds latent chunk l (16
// e4m3, scale block l / 8) of rows 32 h + w + 8 i (i < 4), rope chunk tid % 8 of row
// 32 h + tid / 8, and one scale: that of block l / 8 of row 32 h + w + 8 (l % 4), which the
// lanes of its 8-lane group exchange by shuffles at store time.
struct Fp8Half {
  uint4 lat[4];
  uint4 rope;
  float scale;
};

__device__ __forceinline__ void load_fp8_half(Fp8Half& st, const uint8_t* kv, const int64_t* rows,
                                              int half, int tid) {
  const int warp = tid / 32, lane = tid % 32, base = 32 * half;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = rows[base + warp + 8 * i];
    st.lat[i] =
        row >= 0 ? ld_nc_v4(kv + row * kMlaFp8RowBytes + 16 * lane) : make_uint4(0, 0, 0, 0);
  }
  {
    const int64_t row = rows[base + tid / 8];
    st.rope = row >= 0 ? ld_nc_v4(kv + row * kMlaFp8RowBytes + kFp8RopeOffset + 16 * (tid % 8))
                       : make_uint4(0, 0, 0, 0);
  }
  const int64_t row = rows[base + warp + 8 * (lane % 4)];
  st.scale = row >= 0 ? ld_nc_f32(kv + row * kMlaFp8RowBytes + kFp8ScalesOffset + 4 * (lane / 8))
                      : 0.0f;
}

// Called by all 32 lanes of every warp (shuffles).
__device__ __forceinline__ void store_fp8_half(const Fp8Half& st, uint32_t dst, int half, int tid) {
  const int warp = tid / 32, lane = tid % 32, base = 32 * half;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = base + warp + 8 * i;
    const float scale = __shfl_sync(0xFFFFFFFFu, st.scale, (lane & ~7) | i);
    const uint2 a = dequant4(st.lat[i].x, scale);
    const uint2 b = dequant4(st.lat[i].y, scale);
    const uint2 c = dequant4(st.lat[i].z, scale);
    const uint2 d = dequant4(st.lat[i].w, scale);
    st_shared_v4(dst + 2 * tile_chunk_offset(r, 2 * lane), make_uint4(a.x, a.y, b.x, b.y));
    st_shared_v4(dst + 2 * tile_chunk_offset(r, 2 * lane + 1), make_uint4(c.x, c.y, d.x, d.y));
  }
  st_shared_v4(dst + 2 * tile_chunk_offset(base + tid / 8, kMlaDimLatent / 8 + tid % 8), st.rope);
}

// ---- the kernel ----------------------------------------------------------------------------

template <Mode kMode>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_mla_fwd_kernel(const __grid_constant__ Problem p) {
  using namespace cute;
  constexpr bool kFp8 = kMode == Mode::kDecodeFp8;
  constexpr int kRowBytes = kMode == Mode::kDecodeFp8 ? kMlaFp8RowBytes : kMlaDimQK * 2;
  constexpr float kNegInf = -__builtin_huge_valf();

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  // The swizzle is a function of the address: the tiles must sit on 1024-byte boundaries.
  if ((cute::cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();

  const int tid = threadIdx.x;
  const int wg = tid / 128, t = tid % 128, warp = tid / 32, lane = tid % 32;

  int64_t bid = blockIdx.x;
  const int split = int(bid % p.splits);
  bid /= p.splits;
  const int head0 = int(bid % p.head_groups) * kHeadsPerCta;
  const int64_t row = bid / p.head_groups;
  const int heads = min(kHeadsPerCta, p.Hq - head0);
  const int tile0 = split * p.tiles_per_split;
  const int n_tiles = min(p.tiles_per_split, (p.topk + kBlockKeys - 1) / kBlockKeys - tile0);
  const int64_t key0 = int64_t(tile0) * kBlockKeys;

  const uint32_t smem_q = cute::cast_smem_ptr_to_uint(ss.q);
  const uint32_t smem_kv0 = cute::cast_smem_ptr_to_uint(ss.kv[0]);
  constexpr uint32_t kTileBytes = kTileElems * 2;
  const uint32_t smem_p = cute::cast_smem_ptr_to_uint(ss.p);

  // -- prologue: rows of tiles 0 and 1, the resolution pipeline, Q and tile 0 --
  int idx_a = -1, page_a = -1, idx_b = -1;  // tile i + 2: index, page; tile i + 3: index
  if (tid < kBlockKeys) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int idx = s < n_tiles ? load_index(p, row, key0 + s * kBlockKeys + tid) : -1;
      const int64_t r = resolve_row<kMode>(p, idx, load_page<kMode>(p, row, idx));
      ss.meta[s][tid] = r;
      if (s == 1 && r >= 0) prefetch_l2<kRowBytes>(p.kv + r * kRowBytes);
      const uint32_t bits = __ballot_sync(0xFFFFFFFFu, r >= 0);
      if (lane == 0) ss.valid[s][warp] = bits;
    }
    idx_a = 2 < n_tiles ? load_index(p, row, key0 + 2 * kBlockKeys + tid) : -1;
    page_a = load_page<kMode>(p, row, idx_a);
    idx_b = 3 < n_tiles ? load_index(p, row, key0 + 3 * kBlockKeys + tid) : -1;
  }
  {
    const uint8_t* q_rows =
        reinterpret_cast<const uint8_t*>(p.q + (row * p.Hq + head0) * kMlaDimQK);
#pragma unroll 6
    for (int i = 0; i < kTileChunksPerThread; ++i) {
      const int e = tid + kThreads * i;
      const int r = e / kRowChunks;
      const int c = e - r * kRowChunks;
      load_chunk_or_zero(smem_q + 2 * tile_chunk_offset(r, c),
                         q_rows + int64_t(r) * (kMlaDimQK * 2) + c * 16, r < heads);
    }
  }
  __syncthreads();  // meta of tiles 0, 1
  Fp8Half st;  // FP8: the half tile in flight (see Fp8Half)
  if constexpr (kFp8) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_fp8_half(st, p.kv, ss.meta[0], h, tid);
      store_fp8_half(st, smem_kv0, h, tid);
    }
    if (1 < n_tiles) load_fp8_half(st, p.kv, ss.meta[1], 0, tid);
  } else {
    gather_bf16_tile(smem_kv0, p.kv, kRowBytes, ss.meta[0], tid);
  }
  cp_async_fence();

  TiledMmaS mma_s;
  TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(t);
  auto thr_o = mma_o.get_thread_slice(t);
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<bf16*>(ss.q)), SmemLayoutQ{});
  Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<bf16*>(ss.p)), SmemLayoutP{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tOrP = thr_o.partition_fragment_A(sP);
  Tensor tOrO = partition_fragment_C(mma_o, Shape<_64, Int<kVColsPerWg>>{});
  clear(tOrO);

  // Accumulator element e of a thread: row 16 * (warp % 4) + lane / 4 + 8 * ((e / 2) % 2),
  // column 8 * (e / 4) + 2 * (lane % 4) + e % 2 (CuTe's SM90 64xN C layout).
  const int row_in_wg = 16 * (warp % 4) + lane / 4;
  const float scale_log2 = p.sm_scale * 1.4426950408889634f;
  float m_run[2] = {kNegInf, kNegInf};
  float l_run[2] = {0.0f, 0.0f};

  for (int i = 0; i < n_tiles; ++i) {
    const int buf = i & 1;
    cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();  // cp.async / st.shared writes -> wgmma reads
    __syncthreads();

    // S = Q K^T for this warpgroup's 32 keys (asynchronous).
    Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<bf16*>(ss.kv[buf])), SmemLayoutK{});
    Tensor sKg = local_tile(sK, Shape<Int<kKeysPerWg>, Int<kMlaDimQK>>{}, make_coord(wg, _0{}));
    Tensor tSrK = thr_s.partition_fragment_B(sKg);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kKeysPerWg>>{});
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tSrQ); ++k) {
      cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k), tSrS);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();

    // Tile i + 1 into the other buffer (its last reader, P V of tile i - 1, is done). bf16: the
    // whole gather; FP8: store half 0 (loaded during P V of tile i - 1), load half 1.
    if (i + 1 < n_tiles) {
      if constexpr (kFp8) {
        store_fp8_half(st, smem_kv0 + (buf ^ 1) * kTileBytes, 0, tid);
        load_fp8_half(st, p.kv, ss.meta[(i + 1) % kMetaStages], 1, tid);
      } else {
        gather_bf16_tile(smem_kv0 + (buf ^ 1) * kTileBytes, p.kv, kRowBytes,
                         ss.meta[(i + 1) % kMetaStages], tid);
      }
    }
    if constexpr (!kFp8) cp_async_fence();
    // Resolve tile i + 2 (its meta slot last served tile i - 1, finished before the barrier).
    if (tid < kBlockKeys) {
      if (i + 2 < n_tiles) {
        const int s = (i + 2) % kMetaStages;
        const int64_t r = resolve_row<kMode>(p, idx_a, page_a);
        ss.meta[s][tid] = r;
        // The gather of tile i + 2 is a whole tile away: bring its rows to L2 now.
        if (r >= 0) prefetch_l2<kRowBytes>(p.kv + r * kRowBytes);
        const uint32_t bits = __ballot_sync(0xFFFFFFFFu, r >= 0);
        if (lane == 0) ss.valid[s][warp] = bits;
      }
      idx_a = idx_b;
      page_a = load_page<kMode>(p, row, idx_b);
      idx_b = i + 4 < n_tiles ? load_index(p, row, key0 + int64_t(i + 4) * kBlockKeys + tid) : -1;
    }

    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);

    // Mask, row max of this warpgroup's half, exchange.
    const uint32_t valid = ss.valid[i % kMetaStages][wg];
    float mx[2] = {kNegInf, kNegInf};
    CUTE_UNROLL
    for (int e = 0; e < size(tSrS); ++e) {
      const int col = 8 * (e / 4) + 2 * (lane % 4) + (e % 2);
      const float s = (valid >> col) & 1u ? tSrS(e) : kNegInf;
      tSrS(e) = s;
      mx[(e / 2) % 2] = fmaxf(mx[(e / 2) % 2], s);
    }
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      mx[h] = quad_max(mx[h]);
      if (lane % 4 == 0) ss.row_stat[wg][row_in_wg + 8 * h] = mx[h];
    }
    __syncthreads();
    float alpha[2], m_scaled[2];
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const float other = ss.row_stat[wg ^ 1][row_in_wg + 8 * h];
      // Same operands in both warpgroups (fmaxf is exact and commutative): identical maxima.
      const float m_new = fmaxf(m_run[h], fmaxf(mx[h], other));
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // no valid key yet: exp2(-inf) = 0
      alpha[h] = exp2f((m_run[h] - m_use) * scale_log2);
      m_scaled[h] = m_use * scale_log2;
      m_run[h] = m_new;
      l_run[h] *= alpha[h];
    }
    // P = exp2(S * c - m * c), written to the shared P tile as bf16.
    CUTE_UNROLL
    for (int e = 0; e < size(tSrS); e += 2) {
      const int h = (e / 2) % 2;
      const float p0 = exp2f(fmaf(tSrS(e), scale_log2, -m_scaled[h]));
      const float p1 = exp2f(fmaf(tSrS(e + 1), scale_log2, -m_scaled[h]));
      l_run[h] += p0 + p1;
      const int r = row_in_wg + 8 * h;
      const int col = kKeysPerWg * wg + 8 * (e / 4) + 2 * (lane % 4);
      const uint32_t off = r * 64 + ((((col >> 3) ^ (r & 7))) << 3) + (col & 7);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(smem_p + 2 * off), "r"(pack_bf16x2(p0, p1))
                   : "memory");
    }
    if (__any_sync(0xFFFFFFFFu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
      CUTE_UNROLL
      for (int e = 0; e < size(tOrO); ++e) tOrO(e) *= alpha[(e / 2) % 2];
    }
    cutlass::arch::fence_view_async_shared();
    __syncthreads();

    // O[:, 256 wg : 256 wg + 256] += P V (asynchronous); FP8: dequantise tile i + 1 meanwhile.
    Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<bf16*>(ss.kv[buf])), SmemLayoutVt{});
    Tensor sVg = local_tile(sVt, Shape<Int<kVColsPerWg>, _64>{}, make_coord(wg, _0{}));
    Tensor tOrV = thr_o.partition_fragment_B(sVg);
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    mma_o.accumulate_ = GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tOrP); ++k) {
      cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k), tOrO);
    }
    warpgroup_commit_batch();
    if constexpr (kFp8) {
      // Half 1 of tile i + 1 (loaded during this tile's S), then half 0 of tile i + 2: its rows
      // were resolved in step i before two barriers.
      if (i + 1 < n_tiles) store_fp8_half(st, smem_kv0 + (buf ^ 1) * kTileBytes, 1, tid);
      if (i + 2 < n_tiles) load_fp8_half(st, p.kv, ss.meta[(i + 2) % kMetaStages], 0, tid);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
  }

  // -- epilogue: row sums over both halves, normalise, store --
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    l_run[h] = quad_sum(l_run[h]);
    if (lane % 4 == 0) ss.row_stat[wg][row_in_wg + 8 * h] = l_run[h];
  }
  __syncthreads();
  const int64_t rows_heads = p.rows * p.Hq;
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int r = row_in_wg + 8 * h;
    if (r >= heads) continue;
    const float l = ss.row_stat[0][r] + ss.row_stat[1][r];  // same order in both warpgroups
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? m_run[h] * p.sm_scale + logf(l) : kNegInf;
    const int64_t rh = row * p.Hq + head0 + r;
    if (p.splits == 1) {
      uint16_t* o = p.out + rh * kMlaDimLatent + kVColsPerWg * wg + 2 * (lane % 4);
      CUTE_UNROLL
      for (int e = 2 * h; e < size(tOrO); e += 4) {
        *reinterpret_cast<uint32_t*>(o + 8 * (e / 4)) =
            pack_bf16x2(tOrO(e) * inv, tOrO(e + 1) * inv);
      }
      if (wg == 0 && lane % 4 == 0) p.lse[rh] = lse;
    } else {
      const int64_t prh = split * rows_heads + rh;
      float* o = p.o_part + prh * kMlaDimLatent + kVColsPerWg * wg + 2 * (lane % 4);
      CUTE_UNROLL
      for (int e = 2 * h; e < size(tOrO); e += 4) {
        *reinterpret_cast<float2*>(o + 8 * (e / 4)) = make_float2(tOrO(e) * inv, tOrO(e + 1) * inv);
      }
      if (wg == 0 && lane % 4 == 0) p.lse_part[prh] = lse;
    }
  }
}

// ---- host side (sparse_mla_common.cu) ------------------------------------------------------

struct SplitPlan {
  int splits;
  int tiles_per_split;
};

// Shapes + SM count only (CUDA-graph safe): a query's top-k is split when the (query, head group)
// CTAs alone would leave SMs idle; every split keeps >= kMinTilesPerSplit tiles.
SplitPlan plan_splits(int64_t rows, int Hq, int topk, int num_sms);
int64_t workspace_bytes(int64_t rows, int Hq, const SplitPlan& plan);
// Merges the partial outputs of a split launch (one warp per (query row, head), splits in index
// order): out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s); all-empty rows: 0, -inf.
cudaError_t launch_combine(const Problem& prob, cudaStream_t stream);

inline int head_groups_of(int Hq) { return (Hq + kHeadsPerCta - 1) / kHeadsPerCta; }

// The forward (plus the combine when the plan splits). `prob` arrives with its op fields set;
// the launcher fills in the schedule and the workspace pointers.
template <Mode kMode>
cudaError_t launch(Problem prob, void* workspace, int64_t workspace_bytes_given,
                   cudaStream_t stream) {
  if (prob.rows == 0) return cudaSuccess;
  int sms = 0;
  if (const cudaError_t e = current_device_sms(&sms); e != cudaSuccess) return e;
  SplitPlan plan = plan_splits(prob.rows, prob.Hq, prob.topk, sms);
  if (plan.splits > 1 &&
      (workspace == nullptr || workspace_bytes_given < workspace_bytes(prob.rows, prob.Hq, plan))) {
    plan = {1, (prob.topk + kBlockKeys - 1) / kBlockKeys};  // no room for partials: one pass
  }
  prob.head_groups = head_groups_of(prob.Hq);
  prob.splits = plan.splits;
  prob.tiles_per_split = plan.tiles_per_split;
  if (plan.splits > 1) {
    prob.o_part = static_cast<float*>(workspace);
    prob.lse_part = prob.o_part + int64_t(plan.splits) * prob.rows * prob.Hq * kMlaDimLatent;
  }
  const int64_t blocks = prob.rows * prob.head_groups * plan.splits;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = sparse_mla_fwd_kernel<kMode>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), kThreads, kSmemBytes, stream>>>(prob);
  err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_combine(prob, stream);
}

}  // namespace sparse_mla_sm90
}  // namespace indexcache
