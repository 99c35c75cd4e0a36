// Sparse MLA forward on sm_90a: the one kernel behind sparse_mla_prefill (flat bf16 KV) and
// sparse_mla_decode (paged bf16 or FP8 cache), and the split-k combine. Torch-free; included by
// the .cu files of this folder only.
//
// NOTES:
// - Work unit (one CTA): one query row x one group of 64 heads x one slice of its top-k. 64 heads
//   is the M of a wgmma and the most a CTA can hold: the output accumulator of 64 heads x 512 fp32
//   is half the register file, so Hq = 128 runs as two CTAs per query, a cluster (scheduled
//   together, so the second gather of each KV row hits L2: prefill Hq = 128 +0.7 % over two A/B
//   runs on the H200, session 13), and Hq = 16 / 32 pad the M rows with zero queries that are
//   never stored.
// - Three warpgroups, specialised: a producer (72 registers) that resolves indices to KV rows and
//   fills two 64-key tile buffers, half a tile at a time (dims 0-255 and 256-575, each with its
//   own ready mbarrier), and two math warpgroups (216 registers), each owning half of O's 512
//   columns (128 accumulator registers). S = Q K^T is always one warpgroup's 64 x 64 wgmma
//   (N = 64: the Q operand is read from smem once per 64 keys, so S runs at the tensor rate, not
//   at smem bandwidth).
// - The schedule: WG0 computes S of every tile, the softmax (the only running max) and the P V
//   of columns 0-255 from registers, and hands P and the rescale factor through smem to WG1,
//   which multiplies them into columns 256-511 while WG0 starts S of the next tile. A buffer is
//   refilled whole once both P V of its tile are done, a tile of compute before WG0 needs it:
//   room for rows that come from HBM (decode rows are read once). FP8 rows must also be
//   dequantised after they land: the producer dequantises half 0, WG1 (otherwise idle between
//   its P V) half 1, while its P V of the tile before runs. Prefill queues the next S right
//   behind WG0's P V (WG0 gets 240 registers, WG1 192, so P stays live without spilling).
// - WG0's chain per tile (S, softmax, the handoff, its P V) is what the tensor cores wait on, so
//   the softmax rescales O only when a row max has outgrown its reference by more than a
//   factor 2^8 in P (MathRegs, softmax).
// - Prefill ran a second schedule until session 13: the math warpgroups took alternate tiles,
//   each multiplying both tiles' P into its O columns, with the row max handed over every tile.
//   Half of each refill was then needed right after it was freed. This one measured the same or
//   better on the H200 (prefill Hq = 128 450.7 against 449.8 TFLOP/s in one call, Hq = 16 and 64
//   +1 to +3 % over the sweep; bench/NOTES.md), with one set of handoffs instead of two.
// - Q 72 KB + 2 x 72 KB tiles + 8 KB of P = the 227 KB an sm_90 CTA may use.
// - The KV tile is stored once, row-major [key][576] in 128-byte-swizzled 8x64 atoms; the same
//   bytes are the K-major B operand of Q K^T and the MN-major B operand of P V (V^T view), so
//   nothing is transposed. bf16 rows arrive by cp.async (zero-filled when masked) tracked by the
//   mbarriers; FP8 rows (656 B) are staged raw by cp.async inside the bf16 region of the half they
//   become and dequantised there (e4m3 * fp32 scale, rounded to bf16): half 0 by the producer,
//   half 1 by WG1.
// - Hq = 128 with the FP8 cache: the two head-group CTAs of a query are a cluster and share the
//   conversion: each producer dequantises 32 of every tile's 64 rows and writes them into both
//   CTAs' tiles (st.async, counted by the peer's ready mbarrier); a tile is free once the readers
//   of both CTAs are done.
// - The handoffs between warpgroups are mbarriers (producer <-> math) and named barriers
//   (WG0 <-> WG1). compute-sanitizer racecheck orders two threads' smem accesses across named
//   barriers only by how many bar.syncs each has passed (bar.arrive and mbarrier waits do not
//   count; bench/racecheck_probe.cu), so the math warpgroups pass the same bar.syncs, every value
//   handed over is written before the writer's next bar.sync and read after the reader's, the
//   one warpgroup-local sync (WG1's FP8 staging) is an mbarrier, and smem a math warpgroup
//   writes that the producer refills is released by that warpgroup's own mbarrier arrival.
//   tests/test_sparse_mla_schedule.py replays the schedule on the CPU under random
//   interleavings; a change to the handoff order must be mirrored there.
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
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "indexcache/device.h"
#include "indexcache/params.h"

namespace indexcache {
namespace sparse_mla_sm90 {

// ---- configuration -------------------------------------------------------------------------

constexpr int kHeadsPerCta = 64;     // wgmma M
constexpr int kBlockKeys = 64;       // keys per tile
constexpr int kVColsPerWg = kMlaDimLatent / 2;
constexpr int kMathThreads = 256;    // two math warpgroups
constexpr int kProducerThreads = 128;
constexpr int kThreads = kMathThreads + kProducerThreads;
constexpr int kProducerRegs = 72;
constexpr int kRowChunks = kMlaDimQK * 2 / 16;  // 72 x 16 B per bf16 row
constexpr int kColBlocks = kMlaDimQK / 64;      // 9 swizzled column blocks of 64 dims per tile
constexpr int kHalf0Blocks = 4;                 // half 0: dims 0-255 (WG0's V columns)
constexpr int kMinTilesPerSplit = 2;            // one tile per math warpgroup

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
// P (heads x keys): one column block of a tile, same swizzle.
using SmemLayoutP = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<bf16>{},
                                                 cute::Shape<cute::_64, cute::_64>{}));

using TiledMmaS = decltype(cute::make_tiled_mma(
    cute::GMMA::ss_op_selector<bf16, bf16, float, cute::Shape<cute::_64, cute::_64, cute::_64>,
                               cute::GMMA::Major::K, cute::GMMA::Major::K>()));
// P V with this warpgroup's own P (registers) and with the other's (smem).
using TiledMmaOwnP = decltype(cute::make_tiled_mma(
    cute::GMMA::rs_op_selector<bf16, bf16, float,
                               cute::Shape<cute::_64, cute::Int<kVColsPerWg>, cute::_64>,
                               cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
using TiledMmaPeerP = decltype(cute::make_tiled_mma(
    cute::GMMA::ss_op_selector<bf16, bf16, float,
                               cute::Shape<cute::_64, cute::Int<kVColsPerWg>, cute::_64>,
                               cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

constexpr int kTileElems = kHeadsPerCta * kMlaDimQK;  // 36864
constexpr int kBlockElems = kHeadsPerCta * 64;        // one column block: 4096
constexpr int kRopeBlock = kColBlocks - 1;

struct SharedStorage {
  uint16_t q[kTileElems];                   // offset 0
  uint16_t kv[2][kTileElems];               // offset 73728: buffer b holds tiles of parity b
  uint16_t p[kHeadsPerCta * kBlockKeys];    // offset 221184: P of a tile, WG0 -> WG1
  int64_t rows[2][2][kBlockKeys];           // [pair % 2][buffer][key]: KV row, -1 masked
  uint32_t valid[2][2];                     // [buffer][word]: bit k of word w = key 32 w + k
  float row_exchange[3][kHeadsPerCta];      // [ExchangeSlot][head row]: per-row values handed
                                            // between the math warpgroups
  uint64_t q_ready;
  uint64_t ready[2][2];                     // [buffer][half]: filled (producer -> math)
  uint64_t freed[2];                        // [buffer]: both P V of its tile done (math ->
                                            // producer)
  uint64_t valid_ready[2];                  // [buffer]: valid words of the current tile
  uint64_t staged[2];                       // [buffer]: FP8 raw bytes landed (producer -> WG1)
  uint64_t wg1_staging_read;                // FP8: WG1 read its half's staged bytes (WG1 only)
};
static_assert(offsetof(SharedStorage, kv) % 1024 == 0 && offsetof(SharedStorage, p) % 1024 == 0,
              "swizzled tiles need 1024-byte alignment");
static_assert(offsetof(SharedStorage, q_ready) % 8 == 0, "mbarriers are 8-byte words");
constexpr int kSmemBytes = int(sizeof(SharedStorage));
static_assert(kSmemBytes <= 232448, "over the 227 KB of smem an sm_90 block may opt into");

// Element offset of (row r, 16-byte chunk c) of a 64 x 576 swizzled tile (see SmemLayoutQ).
__device__ __forceinline__ uint32_t tile_chunk_offset(int r, int c) {
  return uint32_t((c >> 3) * 4096 + r * 64 + (((c & 7) ^ (r & 7)) << 3));
}

// Slots of row_exchange, WG0 -> WG1: the rescale factor of a tile (kAlpha), and in the epilogue
// WG0's row sums and row maxima. The epilogue's slots are not kAlpha, which WG1 may still be
// reading for the last tile when WG0 writes them.
enum ExchangeSlot : int { kAlpha = 0, kRowSum = 1, kRowMax = 2 };

// Named barriers (0 is __syncthreads). The two handoffs are passed by all 256 math threads, with
// bar.sync on both sides (see the kernel).
enum NamedBarrierId : uint32_t {
  kPReady = 1,        // WG0 -> WG1: P and alpha of a tile in smem
  kPFree = 2,         // WG1 -> WG0: done with them
  kProducerSync = 3,  // producer warpgroup: row ids written, FP8 staging landed / read
  kRowSums = 4,       // epilogue: WG0's row sums in smem; then the staged O
};

// The same value, but the compiler may not assume so: address arithmetic derived from it stays at
// its use instead of being hoisted out of a loop into registers (and spilled).
template <class T>
__device__ __forceinline__ T* opaque(T* ptr) {
  uint64_t v = reinterpret_cast<uint64_t>(ptr);
  asm volatile("" : "+l"(v));
  return reinterpret_cast<T*>(v);
}

__device__ __forceinline__ int opaque(int v) {
  asm volatile("" : "+r"(v));
  return v;
}

__device__ __forceinline__ void named_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Paired CTAs (one cluster) write into each other's smem and arrive on each other's mbarriers:
// neither may run ahead of the other's barrier init, nor exit while the other can still arrive.
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// The same smem offset in CTA `rank` of the cluster (a shared::cluster address).
__device__ __forceinline__ uint32_t map_to_cta(uint32_t smem_addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(smem_addr), "r"(rank));
  return out;
}

// Arrive on the mbarrier at the same smem offset in CTA `rank` of the cluster. A reader's "done"
// (its wgmma reads retired before): the default .release.cta, as CUTLASS's cluster pipelines
// release a consumer stage. .release.cluster compiles to MEMBAR.ALL.GPU, which held WG0 for a
// fifth of its time after every P V (Nsight Compute, FP8 decode B = 128, Hq = 128, at c486d8d).
__device__ __forceinline__ void arrive_in_cta(uint64_t* bar, uint32_t rank) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(
                   map_to_cta(cute::cast_smem_ptr_to_uint(bar), rank))
               : "memory");
}

// Wait for a phase whose arrivals may come from the other CTA of the cluster.
__device__ __forceinline__ void wait_cluster(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_CLUSTER:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_CLUSTER;\n}\n" ::"r"(cute::cast_smem_ptr_to_uint(bar)),
      "r"(phase)
      : "memory");
}

// ---- problem -------------------------------------------------------------------------------

enum class Mode { kPrefill, kDecodeBf16, kDecodeFp8 };

// Registers per thread after setmaxnreg: the block starts with 168 each (384 x 168 <= 64K), and
// the increases must be covered by what the producer gives back. Prefill queues S of the next
// tile behind WG0's P V, so WG0's P fragment stays live across that issue: at 216 registers
// ptxas spilled 72 B there (session 13). WG1 holds little beside its 128 accumulators, except
// with the FP8 cache, where it dequantises half of every tile.
template <Mode kMode>
struct MathRegs {
  static constexpr int kWg0 = kMode == Mode::kPrefill ? 240 : 216;
  static constexpr int kWg1 = kMode == Mode::kPrefill ? 192 : 216;
  static_assert(128 * (kWg0 + kWg1) + kProducerThreads * kProducerRegs <= 168 * kThreads,
                "register file");
};

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

// A 16-byte chunk from global memory, or 16 zero bytes when !valid (src-size 0: nothing is read,
// so a masked row's address is never formed; `fallback` is any valid global address).
__device__ __forceinline__ void cp_async_16_or_zero(uint32_t dst, const void* src,
                                                    const void* fallback, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(valid ? src : fallback), "r"(valid ? 16 : 0)
               : "memory");
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

// ---- index resolution (one key per producer thread) ----------------------------------------

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

// ---- producer: tile halves into smem -------------------------------------------------------

// Half h of a tile covers column blocks [kFirst, kFirst + kCount): h = 0 dims 0-255, h = 1 dims
// 256-575 (the rest of V and the RoPE block).
template <int kHalf>
struct TileHalf {
  static constexpr int kFirst = kHalf == 0 ? 0 : kHalf0Blocks;
  static constexpr int kCount = kHalf == 0 ? kHalf0Blocks : kColBlocks - kHalf0Blocks;
};

// bf16 rows: 8 threads per 128-byte block row (coalesced), thread pt covers rows pt / 8 + 16 i,
// chunk pt % 8 of every block of the half; cp.async, zero-filled where masked. The producer's
// mbarrier arrival (cpasync_barrier_arrive_noinc) completes when these copies have landed.
template <int kHalf>
__device__ __forceinline__ void copy_bf16_half(uint32_t dst_tile, const uint8_t* kv,
                                               int64_t row_bytes, const int64_t* rows,
                                               const void* fallback, int pt) {
  const int c = pt % 8;
#pragma unroll
  for (int i = 0; i < kBlockKeys / 16; ++i) {
    const int r = pt / 8 + 16 * i;
    const int64_t row = rows[r];
    const uint8_t* src = kv + (row >= 0 ? row : 0) * row_bytes + c * 16;
#pragma unroll
    for (int b = TileHalf<kHalf>::kFirst; b < TileHalf<kHalf>::kFirst + TileHalf<kHalf>::kCount;
         ++b) {
      cp_async_16_or_zero(dst_tile + 2 * tile_chunk_offset(r, 8 * b + c), src + b * 128, fallback,
                          row >= 0);
    }
  }
}

// FP8 rows are staged in smem before dequantisation, inside the bf16 region of the very half they
// become (no other smem is left): the raw e4m3 of the half's 256 latent dims (256 B per row) in
// its last two column blocks, the rows' four fp32 scales (16 B) in the block before. cp.async
// fetches them as soon as the tile is free; once they have landed every thread of the converting
// warpgroup (producer: half 0, WG1: half 1) reads its share into registers (16 e4m3 of chunk
// t % 16 of a row, and their scale), a warpgroup barrier, then all write bf16 over the staging.
//
// Paired CTAs (the two head groups of an Hq = 128 query, one cluster) convert half of the rows
// each and write them into both CTAs' tiles (st.async to the peer, counted by the peer's ready
// mbarrier): each CTA's staging then lives in the region of its own rows (rows 32 c .. 32 c + 31
// of every block, 4 KB), which the peer never writes.
template <bool kPaired>
struct Fp8Rows {
  static constexpr int kCount = kPaired ? kBlockKeys / 2 : kBlockKeys;  // rows this CTA converts
  static constexpr int kRawPerBlock = kCount / 2;  // 256-byte raw rows per staging block
  static constexpr int kPerThread = kCount / 8;    // 16 threads per row
  static constexpr uint32_t kPeerBytes = kPaired ? kCount * 256 * 2 : 0;  // bf16 per half
};

template <int kHalf>
struct Fp8Staging {
  static constexpr int kRawBlock = kHalf == 0 ? 2 : 6;  // raw rows in blocks kRawBlock, +1
  static constexpr int kScaleBlock = kRawBlock - 1;
};

// Byte offset (from the tile) of the staged raw chunk c of local row jr + 8 i, jr < 8 (the split
// keeps the part that depends on i a compile-time constant).
template <int kHalf, bool kPaired, int kI>
__device__ __forceinline__ uint32_t fp8_raw_offset(int first_row, int jr, int c) {
  constexpr int kPer = Fp8Rows<kPaired>::kRawPerBlock;
  constexpr uint32_t kRowPart = (8 * kI / kPer) * kBlockElems * 2 + (8 * kI % kPer) * 256;
  return Fp8Staging<kHalf>::kRawBlock * kBlockElems * 2 + first_row * 128 + jr * 256 + c * 16 +
         kRowPart;
}

template <int kHalf>
__device__ __forceinline__ uint32_t fp8_scale_offset(int first_row, int j) {
  return Fp8Staging<kHalf>::kScaleBlock * kBlockElems * 2 + first_row * 128 + j * 16;
}

// Both halves of a tile's rows, each its own cp.async group (half 0 first: the producer
// dequantises it as soon as it lands). The rows' sources are resolved once for both halves: the
// same rows and scales, 256 bytes apart. Resolved per half, the row ids were reloaded from smem
// after the group fence and the address arithmetic done twice: 104 more instructions per paired
// producer thread and tile, about a quarter of the staging's.
template <bool kPaired>
__device__ __forceinline__ void stage_fp8_tile(uint32_t dst_tile, const uint8_t* kv,
                                               const int64_t* rows, int first_row,
                                               const void* fallback, int pt) {
  constexpr int kPer = Fp8Rows<kPaired>::kPerThread;
  const int c = pt % 16;
  const uint8_t* src[kPer];
  bool valid[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t row = rows[first_row + pt / 16 + 8 * i];
    valid[i] = row >= 0;
    src[i] = kv + (valid[i] ? row : 0) * kMlaFp8RowBytes + 16 * c;
  }
  const bool has_scale = pt < Fp8Rows<kPaired>::kCount;
  const int64_t scale_row = has_scale ? rows[first_row + pt] : -1;
  const uint8_t* scale_src = kv + (scale_row >= 0 ? scale_row : 0) * kMlaFp8RowBytes +
                             kFp8ScalesOffset;
  auto stage_half = [&](auto half) {
    constexpr int kHalf = decltype(half)::value;
    cute::for_each(cute::make_int_sequence<kPer>{}, [&](auto i) {
      cp_async_16_or_zero(dst_tile + fp8_raw_offset<kHalf, kPaired, i>(first_row, pt / 16, c),
                          src[i] + 256 * kHalf, fallback, valid[i]);
    });
    if (has_scale) {
      cp_async_16_or_zero(dst_tile + fp8_scale_offset<kHalf>(first_row, pt), scale_src, fallback,
                          scale_row >= 0);
    }
  };
  stage_half(cute::Int<0>{});
  cute::cp_async_fence();
  stage_half(cute::Int<1>{});
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}

// 16 bytes into another CTA's smem; completes `bytes` of that CTA's mbarrier transaction.
__device__ __forceinline__ void st_async_v4(uint32_t cluster_addr, uint4 v, uint32_t cluster_bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(cluster_addr),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(cluster_bar)
      : "memory");
}

// Called by all threads of the converting warpgroup once the staged bytes have landed.
// `peer_delta` (paired only) moves a local smem address to the same place in the peer CTA.
template <int kHalf, bool kPaired, class SyncStagingRead>
__device__ __forceinline__ void dequant_fp8_half(uint32_t dst_tile, int first_row, int pt,
                                                 SyncStagingRead sync_staging_read,
                                                 uint32_t peer_delta, uint32_t peer_ready) {
  constexpr int kPer = Fp8Rows<kPaired>::kPerThread;
  const int c = pt % 16;
  uint4 lat[kPer];
  float scale[kPer];
  cute::for_each(cute::make_int_sequence<kPer>{}, [&](auto i) {
    const int j = pt / 16 + 8 * i;
    lat[i] = ld_shared_v4(dst_tile + fp8_raw_offset<kHalf, kPaired, i>(first_row, pt / 16, c));
    scale[i] = ld_shared_f32(dst_tile + fp8_scale_offset<kHalf>(first_row, j) +
                             4 * (2 * kHalf + c / 8));
  });
  sync_staging_read();  // all staged bytes read before any is overwritten
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = first_row + pt / 16 + 8 * i;
    const uint2 a = dequant4(lat[i].x, scale[i]);
    const uint2 b = dequant4(lat[i].y, scale[i]);
    const uint2 d = dequant4(lat[i].z, scale[i]);
    const uint2 e = dequant4(lat[i].w, scale[i]);
    const int chunk = 32 * kHalf + 2 * c;  // 8 bf16 per 16-byte chunk
    const uint32_t lo = dst_tile + 2 * tile_chunk_offset(r, chunk);
    const uint32_t hi = dst_tile + 2 * tile_chunk_offset(r, chunk + 1);
    const uint4 v_lo = make_uint4(a.x, a.y, b.x, b.y), v_hi = make_uint4(d.x, d.y, e.x, e.y);
    st_shared_v4(lo, v_lo);
    st_shared_v4(hi, v_hi);
    if constexpr (kPaired) {
      st_async_v4(lo + peer_delta, v_lo, peer_ready);
      st_async_v4(hi + peer_delta, v_hi, peer_ready);
    }
  }
}

// Dequantises half h of the staged FP8 tile at `dst` (this CTA's rows, and paired also into the
// peer's tile), then signals `ready`: thread 0 of the converting warpgroup posts the bytes the
// peer's st.asyncs will complete there. Called by a whole warpgroup (`t`: thread in it) once the
// staged bytes have landed; `sync_staging_read()` synchronises that warpgroup.
template <int kHalf, bool kPaired, class SyncStagingRead>
__device__ __forceinline__ void dequant_and_publish(uint32_t dst, uint64_t* ready, int t,
                                                    SyncStagingRead sync_staging_read) {
  const uint32_t rank = cute::block_rank_in_cluster();
  const uint32_t peer_delta = kPaired ? map_to_cta(dst, rank ^ 1u) - dst : 0;
  const int first_row = kPaired ? int(rank) * Fp8Rows<true>::kCount : 0;
  dequant_fp8_half<kHalf, kPaired>(dst, first_row, t, sync_staging_read, peer_delta,
                                   cute::cast_smem_ptr_to_uint(ready) + peer_delta);
  cutlass::arch::fence_view_async_shared();  // st.shared / cp.async -> wgmma (async proxy)
  if (kPaired && t == 0) {
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(ready,
                                                                   Fp8Rows<kPaired>::kPeerBytes);
  } else {
    cutlass::arch::ClusterBarrier::arrive(ready);
  }
}

// The 64 RoPE dims (bf16) of the 64 FP8 rows: chunk pt % 8 of rows pt / 8 + 16 i.
__device__ __forceinline__ void copy_fp8_rope(uint32_t dst_tile, const uint8_t* kv,
                                              const int64_t* rows, const void* fallback, int pt) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = pt / 8 + 16 * i;
    const int64_t row = rows[r];
    const uint8_t* src = kv + (row >= 0 ? row : 0) * kMlaFp8RowBytes + kFp8RopeOffset;
    cp_async_16_or_zero(dst_tile + 2 * tile_chunk_offset(r, kMlaDimLatent / 8 + pt % 8),
                        src + 16 * (pt % 8), fallback, row >= 0);
  }
}

// Producer warpgroup: Q once, then the tiles in order as their buffers are freed (even tiles ->
// buffer 0, odd -> buffer 1; FP8: staged, half 0 dequantised). Thread pt resolves key pt % 64 of
// the pair's tile pt / 64 (a software pipeline: the index of pair j + 1 and the block-table entry
// of its position are loaded one pair ahead, so no dependent load stalls a fill).
template <Mode kMode, bool kPaired>
__device__ __forceinline__ void producer(const Problem& p, SharedStorage& ss, int64_t qrow,
                                         int head0, int heads, int64_t key0, int n_tiles, int pt) {
  constexpr bool kFp8 = kMode == Mode::kDecodeFp8;
  constexpr int64_t kRowBytes = kFp8 ? kMlaFp8RowBytes : kMlaDimQK * 2;
  const void* fallback = p.q;
  {
    const uint8_t* q_rows =
        reinterpret_cast<const uint8_t*>(p.q + (qrow * p.Hq + head0) * kMlaDimQK);
    const uint32_t smem_q = cute::cast_smem_ptr_to_uint(ss.q);
#pragma unroll 4
    for (int i = 0; i < kHeadsPerCta * kRowChunks / kProducerThreads; ++i) {
      const int e = pt + kProducerThreads * i;
      const int r = e / kRowChunks;
      const int c = e - r * kRowChunks;
      cp_async_16_or_zero(smem_q + 2 * tile_chunk_offset(r, c),
                          q_rows + int64_t(r) * (kMlaDimQK * 2) + c * 16, fallback, r < heads);
    }
    cutlass::arch::cpasync_barrier_arrive_noinc(&ss.q_ready);
  }

  const int buf = pt / kBlockKeys, key = pt % kBlockKeys, warp = pt / 32, lane = pt % 32;
  auto index_of = [&](int pair) {
    const int tile = 2 * pair + buf;
    return tile < n_tiles ? load_index(p, qrow, key0 + int64_t(tile) * kBlockKeys + key) : -1;
  };
  int idx_cur = index_of(0);
  int page_cur = load_page<kMode>(p, qrow, idx_cur);
  int idx_next = index_of(1);
  const uint32_t smem_kv0 = cute::cast_smem_ptr_to_uint(ss.kv[0]);
  constexpr uint32_t kTileBytes = kTileElems * 2;
  const int n_pairs = (n_tiles + 1) / 2;

  // Rows of a pair's two tiles into slot pair % 2 (slot was last read for pair - 2, before every
  // producer thread passed pair - 1's barrier); returns this thread's warp's valid ballot.
  auto resolve_pair = [&](int pair) {
    const int64_t r = resolve_row<kMode>(p, idx_cur, page_cur);
    ss.rows[pair & 1][buf][key] = r;
    const uint32_t valid_bits = __ballot_sync(0xFFFFFFFFu, r >= 0);
    page_cur = load_page<kMode>(p, qrow, idx_next);
    idx_cur = idx_next;
    idx_next = index_of(pair + 2);
    named_sync(kProducerSync, kProducerThreads);
    return valid_bits;
  };
  // The valid words of buffer b are rewritten only after its first reader freed it.
  auto publish_valid = [&](int b, uint32_t valid_bits) {
    if (buf == b && lane == 0) {
      ss.valid[b][warp % 2] = valid_bits;
      cutlass::arch::ClusterBarrier::arrive(&ss.valid_ready[b]);
    }
  };
  auto wait_free = [&](int b, uint32_t phase) {
    if constexpr (kPaired) {
      wait_cluster(&ss.freed[b], phase);  // both CTAs' readers are done
    } else {
      cutlass::arch::ClusterBarrier::wait(&ss.freed[b], phase);
    }
  };
  // The k-th fill of a buffer waits for the (k-1)-th free: parity (k & 1) ^ 1, where a fresh
  // barrier's previous phase counts as done.

  if constexpr (kFp8) {
    // Decode, FP8: a tile is staged as soon as its buffer is free (a tile of math before its
    // S), then the producer dequantises half 0 as soon as it lands and WG1 half 1 (during its
    // P V of the tile before, `staged` says the bytes have landed). Staging tile
    // t + 1 before dequantising tile t instead (f0c3fd5) gates each conversion on the next free:
    // FP8 decode 285 -> 248 TFLOP/s. Addresses are recomputed at use (see opaque()): hoisted,
    // they spill.
    const int pt_fp8 = opaque(pt);
    const int first_row = kPaired ? int(cute::block_rank_in_cluster()) * Fp8Rows<true>::kCount : 0;
    uint32_t valid_bits = 0;
    auto stage_tile = [&](int tile) {
      const int pair = tile >> 1, b = tile & 1;
      if (b == 0) valid_bits = resolve_pair(pair);
      wait_free(b, (pair & 1) ^ 1);
      publish_valid(b, valid_bits);
      const uint32_t dst = smem_kv0 + b * kTileBytes;
      const int64_t* rows = ss.rows[pair & 1][b];
      stage_fp8_tile<kPaired>(dst, p.kv, rows, first_row, fallback, pt_fp8);
      copy_fp8_rope(dst, p.kv, rows, fallback, pt_fp8);
      cute::cp_async_fence();
      cutlass::arch::cpasync_barrier_arrive_noinc(&ss.staged[b]);
    };
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int b = tile & 1;
      stage_tile(tile);
      cute::cp_async_wait<1>();  // this tile's half 0 (half 1, WG1's, may still be in flight)
      named_sync(kProducerSync, kProducerThreads);  // every thread's staged bytes have landed
      dequant_and_publish<0, kPaired>(smem_kv0 + b * kTileBytes, &ss.ready[b][0], pt_fp8,
                                      [] { named_sync(kProducerSync, kProducerThreads); });
    }
  } else {
    // bf16 rows: cp.async, the ready mbarrier completes when they land (nothing to wait for).
    // Whole tiles: buffer b is free once both P V of its previous tile are done.
    for (int pair = 0; pair < n_pairs; ++pair) {
      const uint32_t valid_bits = resolve_pair(pair);
      auto fill_tile = [&](auto b) {
        wait_free(b, (pair & 1) ^ 1);
        publish_valid(b, valid_bits);
        cute::for_each(cute::make_int_sequence<2>{}, [&](auto h) {
          copy_bf16_half<h>(smem_kv0 + b * kTileBytes, p.kv, kRowBytes, ss.rows[pair & 1][b],
                            fallback, pt);
          cutlass::arch::cpasync_barrier_arrive_noinc(&ss.ready[b][h]);
        });
      };
      fill_tile(cute::Int<0>{});
      if (2 * pair + 1 < n_tiles) fill_tile(cute::Int<1>{});
    }
  }
  cute::cp_async_wait<0>();
}

// ---- math warpgroups -----------------------------------------------------------------------

template <int kBegin, int kEnd, class TA, class TB, class TC>
__device__ __forceinline__ void issue_s(TiledMmaS& mma, const TA& tSrQ, const TB& tSrK, TC& rS,
                                        bool clear) {
  using namespace cute;
  warpgroup_arrive();
  CUTE_UNROLL
  for (int k = kBegin; k < kEnd; ++k) {
    mma.accumulate_ = clear && k == kBegin ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
    cute::gemm(mma, tSrQ(_, _, k), tSrK(_, _, k), rS);
  }
  warpgroup_commit_batch();
}

template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void issue_pv(Mma& mma, const TA& tA, const TB& tB, TC& rO) {
  using namespace cute;
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tB); ++k) cute::gemm(mma, tA(_, _, k), tB(_, _, k), rO);
  warpgroup_commit_batch();
}

// P (64 x 64 bf16, in the S accumulator layout) into a swizzled P tile. Each 8 x 8 block of the
// layout is one register per thread in stmatrix's order (row lane / 4, columns 2 (lane % 4) + 0,
// 1), so four stmatrix.x4 store a warp's 16 rows; lanes 8m .. 8m + 7 address the rows of the
// m-th block of an instruction, whose 16 bytes are one swizzled chunk (conflict-free). Word w of
// the fragment holds elements 2w, 2w + 1: block (rows + 8h, columns 8j) is word 2j + h.
template <class TP>
__device__ __forceinline__ void store_p(const TP& rP, uint32_t dst, int warp, int lane) {
  const auto words = cute::recast<uint32_t>(rP);
  const int m = lane / 8;
  const int r = 16 * (warp % 4) + 8 * (m % 2) + lane % 8;
  CUTE_UNROLL
  for (int j = 0; j < 8; j += 2) {
    const int c = j + m / 2;
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                     dst + 2 * (r * 64 + ((c ^ (r & 7)) << 3))),
                 "r"(words(2 * j)), "r"(words(2 * j + 1)), "r"(words(2 * j + 2)),
                 "r"(words(2 * j + 3))
                 : "memory");
  }
}

// ---- the kernel ----------------------------------------------------------------------------

// kPaired: the two head groups of a query are one cluster of two CTAs that share the KV fill
// (FP8 only: each converts half of every tile's rows for both).
template <Mode kMode, bool kPaired>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_mla_fwd_kernel(const __grid_constant__ Problem p) {
  static_assert(!kPaired || kMode == Mode::kDecodeFp8, "only the FP8 fill is shared");
  using namespace cute;
  constexpr float kNegInf = -__builtin_huge_valf();

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  // The swizzle is a function of the address: the tiles must sit on 1024-byte boundaries.
  if ((cute::cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();

  const int tid = threadIdx.x;
  const int wg = tid / 128, t = tid % 128, warp = tid / 32, lane = tid % 32;

  // Head groups vary fastest: the CTAs of one (query, split) are adjacent, one cluster at
  // Hq = 128.
  int64_t bid = blockIdx.x;
  const int head0 = int(bid % p.head_groups) * kHeadsPerCta;
  bid /= p.head_groups;
  const int split = int(bid % p.splits);
  const int64_t qrow = bid / p.splits;
  const int heads = min(kHeadsPerCta, p.Hq - head0);
  const int tile0 = split * p.tiles_per_split;
  const int n_tiles = min(p.tiles_per_split, (p.topk + kBlockKeys - 1) / kBlockKeys - tile0);
  const int64_t key0 = int64_t(tile0) * kBlockKeys;

  if (tid == 0) {
    using cutlass::arch::ClusterBarrier;
    ClusterBarrier::init(&ss.q_ready, kProducerThreads);
    for (int b = 0; b < 2; ++b) {
      for (int h = 0; h < 2; ++h) ClusterBarrier::init(&ss.ready[b][h], kProducerThreads);
      // One arrival per thread of both math warpgroups; paired, also lane 0 of each warp of the
      // peer's (it reads the rows this CTA converts).
      ClusterBarrier::init(&ss.freed[b], 2 * (128 + (kPaired ? 4 : 0)));
      ClusterBarrier::init(&ss.valid_ready[b], 2);  // lane 0 of the two warps resolving buffer b
      ClusterBarrier::init(&ss.staged[b], kProducerThreads);
    }
    ClusterBarrier::init(&ss.wg1_staging_read, kMathThreads / 2);  // WG1's threads
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kPaired) {
    cluster_sync_all();
  } else {
    __syncthreads();
  }

  if (wg == 2) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    producer<kMode, kPaired>(p, ss, qrow, head0, heads, key0, n_tiles, t);
    if constexpr (kPaired) cluster_sync_all();
    return;
  }

  TiledMmaS mma_s;
  TiledMmaOwnP mma_own;
  TiledMmaPeerP mma_peer;
  auto thr_s = mma_s.get_thread_slice(t);
  auto thr_own = mma_own.get_thread_slice(t);
  auto thr_peer = mma_peer.get_thread_slice(t);
  // Operand descriptors are rebuilt at each use from an opaque pointer: hoisted out of the loop,
  // the 84 64-bit descriptors of Q, K, V and P would hold registers the accumulators need.
  bf16* const q_ptr = reinterpret_cast<bf16*>(ss.q);
  bf16* const buf0 = reinterpret_cast<bf16*>(ss.kv[0]);
  bf16* const buf1 = reinterpret_cast<bf16*>(ss.kv[1]);
  bf16* const p_ptr = reinterpret_cast<bf16*>(ss.p);
  auto frag_q = [&] {
    return thr_s.partition_fragment_A(make_tensor(make_smem_ptr(opaque(q_ptr)), SmemLayoutQ{}));
  };
  auto frag_k = [&](bf16* buf) {
    return thr_s.partition_fragment_B(make_tensor(make_smem_ptr(opaque(buf)), SmemLayoutK{}));
  };
  auto frag_v = [&](auto& thr, bf16* buf) {
    Tensor v = make_tensor(make_smem_ptr(opaque(buf)), SmemLayoutVt{});
    return thr.partition_fragment_B(
        local_tile(v, Shape<Int<kVColsPerWg>, _64>{}, make_coord(wg, _0{})));
  };
  // WG0's P in smem as WG1's A operand.
  auto frag_p = [&] {
    return thr_peer.partition_fragment_A(make_tensor(make_smem_ptr(opaque(p_ptr)), SmemLayoutP{}));
  };

  Tensor rS = partition_fragment_C(mma_s, Shape<_64, _64>{});  // S, then P in fp32
  Tensor rP = make_tensor<bf16>(partition_shape_A(mma_own, Shape<_64, _64>{}));
  Tensor rO = partition_fragment_C(mma_own, Shape<_64, Int<kVColsPerWg>>{});
  clear(rO);

  // Accumulator element e of a thread: row 16 * (warp % 4) + lane / 4 + 8 * ((e / 2) % 2),
  // column 8 * (e / 4) + 2 * (lane % 4) + e % 2 (CuTe's SM90 64xN C layout; the A-operand
  // register layout of the P V wgmma has the same element order, so P converts element-wise).
  const int row_in_wg = 16 * (warp % 4) + lane / 4;
  const float scale_log2 = p.sm_scale * 1.4426950408889634f;
  float m_run[2] = {kNegInf, kNegInf};  // raw-score reference that O and l are relative to
  float l_run[2] = {0.0f, 0.0f};        // WG0: the row sums, same reference

  // Masks S of the tile in buffer b (invalid keys: -inf); `tile_max`: its row max.
  auto mask_s = [&](int b, float (&tile_max)[2]) {
    const uint32_t v0 = ss.valid[b][0], v1 = ss.valid[b][1];
    if ((v0 & v1) != 0xFFFFFFFFu) {  // the same for the whole CTA; none in a full top-k list
      CUTE_UNROLL
      for (int e = 0; e < size(rS); ++e) {
        const int col = 8 * (e / 4) + 2 * (lane % 4) + (e % 2);
        const uint32_t word = e / 4 < 4 ? v0 : v1;
        if (!((word >> (col % 32)) & 1u)) rS(e) = kNegInf;
      }
    }
    float mx[2] = {kNegInf, kNegInf};
    CUTE_UNROLL
    for (int e = 0; e < size(rS); ++e) mx[(e / 2) % 2] = fmaxf(mx[(e / 2) % 2], rS(e));
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) tile_max[h] = quad_max(mx[h]);
  };
  // WG0: moves the reference m_run to the masked tile's row max where that exceeds it by more
  // than kRescaleSlack (log2 units of the scaled score), and makes P relative to the reference
  // (rS: fp32 P, rP: bf16 P); O and l move to a new reference by `alpha`. Otherwise the
  // reference stays and alpha is 1, so neither warpgroup rescales its 128 accumulators: P is then
  // at most 2^kRescaleSlack, far inside fp32 and bf16 range, and the result is the same sum (the
  // epilogue divides by l and adds the reference back into the lse).
  auto softmax = [&](const float (&tile_max)[2], float (&alpha)[2]) {
    constexpr float kRescaleSlack = 8.0f;
    float m_scaled[2];
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      // Written so that a row with no valid key yet (m_run = -inf) always moves.
      const bool rebase = !(tile_max[h] * scale_log2 <= fmaf(m_run[h], scale_log2, kRescaleSlack));
      const float m_new = rebase ? tile_max[h] : m_run[h];
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // no valid key yet: exp2(-inf) = 0
      alpha[h] = rebase ? exp2f((m_run[h] - m_use) * scale_log2) : 1.0f;
      m_scaled[h] = m_use * scale_log2;
      m_run[h] = m_new;
      l_run[h] *= alpha[h];
    }
    CUTE_UNROLL
    for (int e = 0; e < size(rS); ++e) {
      const int h = (e / 2) % 2;
      rS(e) = exp2f(fmaf(rS(e), scale_log2, -m_scaled[h]));
      l_run[h] += rS(e);
      rP(e) = bf16(rS(e));
    }
    if (__any_sync(0xFFFFFFFFu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
      CUTE_UNROLL
      for (int e = 0; e < size(rO); ++e) rO(e) *= alpha[(e / 2) % 2];
    }
  };
  // One value per row (the quad's lane 0 writes it) into an exchange slot, and reading it back.
  auto publish_rows = [&](int slot, const float (&v)[2]) {
    if (lane % 4 == 0) {
      ss.row_exchange[slot][row_in_wg] = v[0];
      ss.row_exchange[slot][row_in_wg + 8] = v[1];
    }
  };
  auto exchanged = [&](int slot, int h) { return ss.row_exchange[slot][row_in_wg + 8 * h]; };
  auto wait_s = [&]() {
    warpgroup_wait<0>();
    warpgroup_fence_operand(rS);
  };

  // A buffer is free once both warpgroups' P V of its tile are done and, paired, the peer's (the
  // peer writes its rows into both).
  auto free_buffer = [&](int b) {
    cutlass::arch::ClusterBarrier::arrive(&ss.freed[b]);
    if constexpr (kPaired) {
      if (lane == 0) arrive_in_cta(&ss.freed[b], cute::block_rank_in_cluster() ^ 1u);
    }
  };

  using cutlass::arch::ClusterBarrier;
  // S of the tile in buffer b (`phase`: its fill's parity), each half once it has landed;
  // `between` runs after the first half is issued.
  auto tile_s = [&](int b, uint32_t phase, auto between) {
    bf16* const buf = b ? buf1 : buf0;
    ClusterBarrier::wait(&ss.ready[b][0], phase);
    warpgroup_fence_operand(rS);
    issue_s<0, 16>(mma_s, frag_q(), frag_k(buf), rS, true);
    between();
    ClusterBarrier::wait(&ss.ready[b][1], phase);
    issue_s<16, 36>(mma_s, frag_q(), frag_k(buf), rS, false);
    wait_s();
  };
  const auto nothing = [] {};
  ClusterBarrier::wait(&ss.q_ready, 0);
  // WG0: S of every tile, the softmax (the one running max), P to smem for WG1, P V of O
  // columns 0-255 from registers; S of the next tile overlaps WG1's P V. WG1: rescales its O by
  // WG0's alpha and multiplies P from smem into O columns 256-511. A buffer is free once both
  // P V of its tile are done, a tile before its next use.
  // Both warpgroups bar.sync both handoffs (no bar.arrive): WG1 has nothing to do between
  // kPFree and kPReady and is the one waiting at either, so WG0 never waits longer
  // for it. Each warpgroup then passes the same bar.syncs, which compute-sanitizer racecheck
  // needs to see the handoffs: it orders shared-memory accesses of two threads by how many
  // bar.syncs each has passed, so a bar.arrive -> bar.sync handoff in both directions reads as
  // a race (bench/racecheck_probe.cu; bench/NOTES.md, session 10).
  if (wg == 0) {
    cutlass::arch::warpgroup_reg_alloc<MathRegs<kMode>::kWg0>();
    if (n_tiles > 0) tile_s(0, 0, nothing);
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int b = tile & 1;
      ClusterBarrier::wait(&ss.valid_ready[b], (tile >> 1) & 1);
      float tile_max[2], alpha[2];
      mask_s(b, tile_max);
      softmax(tile_max, alpha);
      if (tile > 0) named_sync(kPFree, kMathThreads);  // WG1 done with P, alpha of tile - 1
      store_p(rP, cute::cast_smem_ptr_to_uint(p_ptr), warp, lane);
      publish_rows(kAlpha, alpha);
      cutlass::arch::fence_view_async_shared();
      named_sync(kPReady, kMathThreads);
      warpgroup_fence_operand(rO);
      warpgroup_fence_operand(rP);
      issue_pv(mma_own, rP, frag_v(thr_own, b ? buf1 : buf0), rO);
      // Frees buffer b once this P V has retired; `later` wgmma batches (the next S) may not.
      auto free_after_pv = [&](auto later) {
        warpgroup_wait<decltype(later)::value>();
        warpgroup_fence_operand(rO);
        free_buffer(b);
      };
      if (kMode == Mode::kPrefill && tile + 1 < n_tiles) {
        // Prefill: the next tile landed during this one (its rows come from L2), so the first
        // half of its S queues right behind this P V (the tensor cores do not idle while WG0
        // sees the P V retire and frees the buffer), and the buffer is freed before WG0 waits
        // for the second half, whose fill may still be in flight: otherwise a late fill delays
        // the next refill. Headline Hq = 128 449.7 -> 455 -> 484 TFLOP/s (bench/NOTES.md).
        tile_s(b ^ 1, ((tile + 1) >> 1) & 1, [&] { free_after_pv(cute::Int<1>{}); });
      } else {
        // Decode: buffer b is freed as soon as this P V is done, not once the next tile has
        // arrived (which made the refill of b wait on the fill of the other buffer: FP8 decode
        // 285 TFLOP/s at d2a6110 then, bf16 decode 396 -> 417 without). Its S queued behind
        // the P V measured slower for bf16 decode (442 -> 423 TFLOP/s, session 16).
        free_after_pv(cute::Int<0>{});
        if (tile + 1 < n_tiles) tile_s(b ^ 1, ((tile + 1) >> 1) & 1, nothing);
      }
    }
  } else {
    // FP8: WG1 dequantises half 1 of every tile (its own V columns and the second half of S)
    // while its P V of the tile before runs: it would otherwise idle, and the producer's period
    // would hold both conversions. After that P V instead (59d59c2), WG0 waited for it in the
    // next S: a third of WG0's time (Nsight Compute, FP8 decode B = 128, Hq = 128).
    // Its staging sync is an mbarrier, not a named barrier: a bar.sync that WG0 does not pass
    // too would put the two warpgroups' bar.sync counts out of step for racecheck (above).
    auto convert_half1 = [&](int tile) {
      if constexpr (kMode == Mode::kDecodeFp8) {
        const int b = tile & 1;
        ClusterBarrier::wait(&ss.staged[b], (tile >> 1) & 1);
        dequant_and_publish<1, kPaired>(cute::cast_smem_ptr_to_uint(b ? buf1 : buf0),
                                        &ss.ready[b][1], t, [&] {
                                          ClusterBarrier::arrive(&ss.wg1_staging_read);
                                          ClusterBarrier::wait(&ss.wg1_staging_read, tile & 1);
                                        });
      }
    };
    cutlass::arch::warpgroup_reg_alloc<MathRegs<kMode>::kWg1>();
    if (n_tiles > 0) convert_half1(0);
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int b = tile & 1;
      named_sync(kPReady, kMathThreads);
      float alpha[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) alpha[h] = exchanged(kAlpha, h);
      if (__any_sync(0xFFFFFFFFu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
        CUTE_UNROLL
        for (int e = 0; e < size(rO); ++e) rO(e) *= alpha[(e / 2) % 2];
      }
      warpgroup_fence_operand(rO);
      issue_pv(mma_peer, frag_p(), frag_v(thr_peer, b ? buf1 : buf0), rO);
      // The other buffer: staged once tile - 1's P V were done, so no wait on this P V.
      if (tile + 1 < n_tiles) convert_half1(tile + 1);
      warpgroup_wait<0>();
      warpgroup_fence_operand(rO);
      free_buffer(b);
      if (tile + 1 < n_tiles) named_sync(kPFree, kMathThreads);
    }
  }

  // -- epilogue: WG0's row sums and maxima to both warpgroups, normalise, store --
  if (wg == 0) {
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) l_run[h] = quad_sum(l_run[h]);
    publish_rows(kRowSum, l_run);
    publish_rows(kRowMax, m_run);
  }
  named_sync(kRowSums, kMathThreads);
  const int64_t rows_heads = p.rows * p.Hq;
  float inv[2];
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int r = row_in_wg + 8 * h;
    const float l = ss.row_exchange[kRowSum][r];
    const float m = ss.row_exchange[kRowMax][r];
    inv[h] = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? m * p.sm_scale + logf(l) : kNegInf;
    const int64_t rh = qrow * p.Hq + head0 + r;
    if (r < heads && wg == 0 && lane % 4 == 0) {
      if (p.splits == 1) {
        p.lse[rh] = lse;
      } else {
        p.lse_part[split * rows_heads + rh] = lse;
      }
    }
  }
  if (p.splits == 1) {
    // bf16 O through smem (the Q tile: both warpgroups' last S is done), then whole rows of
    // 1 KB with 16-byte stores: the accumulator layout would store 4 bytes per lane, 8 rows per
    // instruction. 16-byte chunk c of row r sits at chunk c ^ (r % 8) (conflict-free both ways).
    const uint32_t smem_o = cute::cast_smem_ptr_to_uint(ss.q);
    constexpr int kRowBytesO = kMlaDimLatent * 2;
    CUTE_UNROLL
    for (int e = 0; e < size(rO); e += 2) {
      const int h = (e / 2) % 2, r = row_in_wg + 8 * h;
      const int col = kVColsPerWg * wg + 8 * (e / 4) + 2 * (lane % 4);
      const uint32_t addr = smem_o + r * kRowBytesO + (((col / 8) ^ (r % 8)) * 16) + (col % 8) * 2;
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr),
                   "r"(pack_bf16x2(rO(e) * inv[h], rO(e + 1) * inv[h]))
                   : "memory");
    }
    named_sync(kRowSums, kMathThreads);
    uint16_t* out = p.out + (qrow * p.Hq + head0) * kMlaDimLatent;
    constexpr int kChunksPerRow = kRowBytesO / 16;
    CUTE_UNROLL
    for (int i = 0; i < kHeadsPerCta * kChunksPerRow / kMathThreads; ++i) {
      const int idx = tid + kMathThreads * i;
      const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
      if (r >= heads) break;  // rows ascend with i
      const uint4 v = ld_shared_v4(smem_o + r * kRowBytesO + ((c ^ (r % 8)) * 16));
      *reinterpret_cast<uint4*>(out + int64_t(r) * kMlaDimLatent + c * 8) = v;
    }
  } else {
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = row_in_wg + 8 * h;
      if (r >= heads) continue;
      const int64_t prh = split * rows_heads + qrow * p.Hq + head0 + r;
      float* o = p.o_part + prh * kMlaDimLatent + kVColsPerWg * wg + 2 * (lane % 4);
      CUTE_UNROLL
      for (int e = 2 * h; e < size(rO); e += 4) {
        *reinterpret_cast<float2*>(o + 8 * (e / 4)) =
            make_float2(rO(e) * inv[h], rO(e + 1) * inv[h]);
      }
    }
  }
  if constexpr (kPaired) cluster_sync_all();
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

template <Mode kMode, bool kPaired>
cudaError_t launch_forward(const Problem& prob, int64_t blocks, cudaStream_t stream) {
  auto kernel = sparse_mla_fwd_kernel<kMode, kPaired>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = prob.head_groups == 2 ? 1 : 0;  // paired or not (see the NOTES)
  return cudaLaunchKernelEx(&config, kernel, prob);
}

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
  // Hq = 128 with the FP8 cache: the two head groups share the dequantisation (a cluster of two).
  cudaError_t err = kMode == Mode::kDecodeFp8 && prob.head_groups == 2
                        ? launch_forward<kMode, kMode == Mode::kDecodeFp8>(prob, blocks, stream)
                        : launch_forward<kMode, false>(prob, blocks, stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_combine(prob, stream);
}

}  // namespace sparse_mla_sm90
}  // namespace indexcache
