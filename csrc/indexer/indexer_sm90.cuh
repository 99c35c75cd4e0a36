// Building blocks shared by the two SM90 indexer-logits kernels (ragged prefill and paged decode):
// the compiled configuration, the FP8 wgmma tile, the head reduction of its accumulators, the
// balanced persistent schedule, and the host-side tensor-map encoding. Torch-free.
//
// NOTES:
// - Orientation (DeepGEMM's): one wgmma is [64 keys x D] x [D x 128 (queries x heads)], keys on M
//   and (query, head) on N. The head sum is then a reduction along N, which a thread holds in its
//   own registers (32 of the 128 columns) plus its 3 quad neighbours: 2 shuffles instead of the
//   cross-warp smem reduction that heads-on-M would need. With heads on M the reduction costs more
//   issue slots than the MMA itself.
// - A CTA holds 4 math warpgroups (4 x 64 = 256 keys per tile, all reading the same Q group from
//   smem) and one producer warpgroup whose one lane drives TMA. 640 threads cap the launch at 96
//   registers; setmaxnreg moves the producer to 24 and the math warpgroups to 112, which holds the
//   64 accumulators, the lane's 32 head weights and the loop state without spilling. (A lone
//   producer warp does not help: 5 warps per sub-partition still cap everyone at 96, and
//   setmaxnreg needs whole warpgroups.)
// - The epilogue never leaves registers: relu * weight over the thread's 32 columns, a quad
//   reduce-scatter, one key scale per lane, one 4-byte store per (lane, query pair): a warp writes
//   16 consecutive keys of each of 2 query rows. The 4 math warpgroups work on the same tile and
//   drift apart, so one's fold overlaps the others' MMAs.
// - Accuracy: FP8 wgmma adds the products of a k-step with ~14 significant bits, exactly as
//   cuBLAS's FP8 GEMM does on the same inputs (measured identical errors: relative Frobenius
//   1.25e-4 vs float64 at H = 64, D = 128), against ~1e-8 for fp32 CUDA-core sums. One score whose
//   head sum cancels can be off by a few 1e-3 of itself (3.4e-3 seen at S = N = 1), never more
//   than ~4e-4 of its magnitude k_scale * sum_h |w| relu(q . k).
// - Both operands are K-major e4m3 tiles whose rows are exactly one swizzle span (D = 128: 128B
//   swizzle, D = 64: 64B swizzle), written by TMA with the matching swizzle; a k32 step advances
//   the descriptor start address by 32 bytes inside the span, the hardware applies the XOR pattern.
// - The schedule is computed on the device from the windows / context lengths in every CTA (no host
//   metadata, CUDA-graph safe): work items (query groups or sequences) are cut into 256-key tiles,
//   and CTA g takes tiles [g T / G, (g+1) T / G) of the concatenated list, so CTAs finish together
//   whatever the windows look like.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "indexcache/device.h"
#include "indexcache/params.h"
#include "indexcache/tensor_map.h"

namespace indexcache {
namespace indexer_sm90 {

// kExtraBytes_: shared memory a kernel keeps beside the rings (the candidate stage's staging
// lists), taken from kSmemBudget_ before the key stages are counted.
template <int kHeads_, int kHeadDim_, int kMaxQueryGroups_, int kExtraBytes_ = 0,
          int kSmemBudget_ = 192 * 1024>
struct Config {
  static constexpr int kHeads = kHeads_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeads == 32 || kHeads == 64, "heads");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim");

  // One wgmma: M = 64 keys (per math warpgroup), N = 128 (query, head) columns, K = 32.
  static constexpr int kMmaM = 64;
  static constexpr int kMmaN = 128;
  static constexpr int kMmaK = 32;
  static constexpr int kKSteps = kHeadDim / kMmaK;
  static constexpr int kAccum = kMmaN / 2;                   // fp32 accumulators per thread
  static constexpr int kQueriesPerGroup = kMmaN / kHeads;    // 2 (H = 64) or 4 (H = 32)
  static constexpr int kQueriesPerLane = kQueriesPerGroup / 2;  // after the quad reduce-scatter
  static constexpr int kColGroupsPerQuery = kHeads / 8;      // n8 column groups of one query

  static constexpr int kMathWarpgroups = 4;
  static constexpr int kMathThreads = kMathWarpgroups * 128;
  static constexpr int kThreads = kMathThreads + 128;        // + the TMA producer warpgroup
  // 5 warps per SM sub-partition cap the launch at 96 registers per thread; the producer gives
  // all but 24 back (setmaxnreg) so the math warpgroups can hold 64 accumulators, 32 weights and
  // their loop state in 112 (128 * 24 + 512 * 112 <= 640 * 96).
  static constexpr int kLaunchRegisters = 96;
  static constexpr int kProducerRegisters = 24;
  static constexpr int kMathRegisters = 112;
  static_assert(128 * kProducerRegisters + kMathThreads * kMathRegisters <=
                    kThreads * kLaunchRegisters, "register pool");
  static constexpr int kTileKeys = kMathWarpgroups * kMmaM;  // 256

  // Shared memory: Q stages (up to kMaxQueryGroups groups of 128 rows each), then key stages.
  static constexpr int kMaxQueryGroups = kMaxQueryGroups_;
  static constexpr int kQGroupBytes = kMmaN * kHeadDim;
  static constexpr int kQStageBytes = kMaxQueryGroups * kQGroupBytes;
  static constexpr int kQStages = 2;  // the next group's Q loads while this one is multiplied
  static constexpr int kTileBytes = kTileKeys * kHeadDim;
  static constexpr int kSubTileBytes = kMmaM * kHeadDim;     // one warpgroup's 64 rows
  static constexpr int kExtraBytes = kExtraBytes_;
  static constexpr int kSmemBudget = kSmemBudget_;
  static constexpr int kKVStagesFit =
      (kSmemBudget - kExtraBytes - kQStages * kQStageBytes) / kTileBytes;
  static constexpr int kKVStages = kKVStagesFit < 8 ? kKVStagesFit : 8;
  static_assert(kKVStages >= 2, "smem");
  static constexpr int kBarrierBytes = 8 * (2 * kQStages + 2 * kKVStages);
  static constexpr int kScratchBytes = 256;
  static constexpr int kAlign = 1024;  // 128B-swizzle atom: 8 rows x 128 bytes
  static constexpr int kSmemBytes = kAlign + kQStages * kQStageBytes + kKVStages * kTileBytes +
                                    kBarrierBytes + kScratchBytes + kExtraBytes;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// ---------------------------------------------------------------------------------------------
// Device helpers

using Barrier = cutlass::arch::ClusterTransactionBarrier;
constexpr uint64_t kTmaCacheHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);

template <class T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}
template <class T>
__host__ __device__ __forceinline__ constexpr T cmin(T a, T b) {
  return a < b ? a : b;
}
template <class T>
__host__ __device__ __forceinline__ constexpr T cmax(T a, T b) {
  return a < b ? b : a;
}

// Pointers into the dynamic shared memory of one CTA.
template <class C>
struct SmemLayout {
  uint8_t* q;          // kQStages x kQStageBytes
  uint8_t* kv;         // kKVStages x kTileBytes
  uint64_t* full_q;    // kQStages
  uint64_t* empty_q;   // kQStages
  uint64_t* full_kv;   // kKVStages
  uint64_t* empty_kv;  // kKVStages
  int64_t* scratch;    // kScratchBytes / 8
  uint8_t* extra;      // kExtraBytes, 16-byte aligned

  __device__ __forceinline__ explicit SmemLayout(uint8_t* raw) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
    uint8_t* base = raw + ((C::kAlign - (addr % C::kAlign)) % C::kAlign);
    q = base;
    kv = q + C::kQStages * C::kQStageBytes;
    full_q = reinterpret_cast<uint64_t*>(kv + C::kKVStages * C::kTileBytes);
    empty_q = full_q + C::kQStages;
    full_kv = empty_q + C::kQStages;
    empty_kv = full_kv + C::kKVStages;
    scratch = reinterpret_cast<int64_t*>(empty_kv + C::kKVStages);
    extra = reinterpret_cast<uint8_t*>(scratch) + C::kScratchBytes;
  }

  // Thread 0 only; published by the __syncthreads of the schedule that follows.
  __device__ __forceinline__ void init_barriers() const {
    for (int i = 0; i < C::kQStages; ++i) {
      Barrier::init(&full_q[i], 1);
      Barrier::init(&empty_q[i], C::kMathThreads);
    }
    for (int i = 0; i < C::kKVStages; ++i) {
      Barrier::init(&full_kv[i], 1);
      Barrier::init(&empty_kv[i], C::kMathThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
};

// Stage index and phase parity of the i-th use of a ring of kStages buffers.
template <int kStages>
struct Ring {
  int stage;
  uint32_t phase;
  __device__ __forceinline__ explicit Ring(int i)
      : stage(i % kStages), phase(static_cast<uint32_t>((i / kStages) & 1)) {}
};

// wgmma descriptor of a K-major e4m3 tile whose rows are kHeadDim bytes, written by TMA with the
// swizzle of that width (128B for D = 128, 64B for D = 64): bits [0, 14) start address >> 4,
// [16, 30) leading byte offset >> 4 (unused by swizzled K-major layouts, 1 by convention),
// [32, 46) stride byte offset >> 4 (8-row groups are 8 * kHeadDim bytes apart), [49, 52) base
// offset (0: every tile starts on a swizzle-atom boundary), [62, 64) layout (1 = 128B, 2 = 64B).
template <int kHeadDim>
struct SmemDesc {
  static constexpr uint64_t kLayout = kHeadDim == 128 ? 1 : 2;
  static constexpr uint64_t kConst =
      (kLayout << 62) | (uint64_t((8 * kHeadDim) >> 4) << 32) | (uint64_t(1) << 16);
  __device__ __forceinline__ static uint64_t make(uint32_t smem_addr) {
    return kConst | uint64_t((smem_addr >> 4) & 0x3FFFu);
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

template <int... I>
__device__ __forceinline__ void wgmma_m64n128k32(uint64_t desc_a, uint64_t desc_b, float (&acc)[64],
                                                 bool accumulate,
                                                 std::integer_sequence<int, I...>) {
  cute::SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<>::fma(
      desc_a, desc_b, acc[I]...,
      accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

// Columns [64 kHalf, 64 kHalf + 64) of the tile into acc[32 kHalf, 32 kHalf + 32): the n64
// accumulator layout is the n128 one restricted to n8 groups 8 kHalf .. 8 kHalf + 7, so
// acc[4j + 2 half + e] keeps meaning column 8j + 2 quad + e either way.
template <int kHalf, int... I>
__device__ __forceinline__ void wgmma_m64n64k32(uint64_t desc_a, uint64_t desc_b, float (&acc)[64],
                                                bool accumulate,
                                                std::integer_sequence<int, I...>) {
  cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>::fma(
      desc_a, desc_b, acc[32 * kHalf + I]...,
      accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

// acc[64 keys x 128 columns] = keys[64 x D] . q_group[128 x D]^T for the calling warpgroup.
// Returns with the result in registers (waits for the tensor cores).
template <class C>
__device__ __forceinline__ void mma_tile(uint32_t keys, uint32_t q_group, float (&acc)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) cute::warpgroup_fence_operand(acc[i]);
  cute::warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < C::kKSteps; ++k) {
    wgmma_m64n128k32(SmemDesc<C::kHeadDim>::make(keys + k * C::kMmaK),
                     SmemDesc<C::kHeadDim>::make(q_group + k * C::kMmaK), acc, k > 0,
                     std::make_integer_sequence<int, 64>{});
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
#pragma unroll
  for (int i = 0; i < 64; ++i) cute::warpgroup_fence_operand(acc[i]);
}

// The same product issued as two n64 halves in two commit groups, so the caller can fold the
// first half's heads (mma_wait_half<0>) while the tensor cores still work on the second
// (mma_wait_half<1>). Costs one more read of the key sub-tile from smem per tile.
template <class C>
__device__ __forceinline__ void mma_tile_issue_halves(uint32_t keys, uint32_t q_group,
                                                      float (&acc)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) cute::warpgroup_fence_operand(acc[i]);
  cute::warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < C::kKSteps; ++k) {
    wgmma_m64n64k32<0>(SmemDesc<C::kHeadDim>::make(keys + k * C::kMmaK),
                       SmemDesc<C::kHeadDim>::make(q_group + k * C::kMmaK), acc, k > 0,
                       std::make_integer_sequence<int, 32>{});
  }
  cute::warpgroup_commit_batch();
#pragma unroll
  for (int k = 0; k < C::kKSteps; ++k) {
    wgmma_m64n64k32<1>(SmemDesc<C::kHeadDim>::make(keys + k * C::kMmaK),
                       SmemDesc<C::kHeadDim>::make(q_group + 64 * C::kHeadDim + k * C::kMmaK),
                       acc, k > 0, std::make_integer_sequence<int, 32>{});
  }
  cute::warpgroup_commit_batch();
}

template <int kHalf>
__device__ __forceinline__ void mma_wait_half(float (&acc)[64]) {
  cute::warpgroup_wait<1 - kHalf>();
#pragma unroll
  for (int i = 32 * kHalf; i < 32 * kHalf + 32; ++i) cute::warpgroup_fence_operand(acc[i]);
}

// The lane's place in the wgmma accumulator: thread (warp w of the warpgroup, lane l) holds rows
// 16w + l/4 and 16w + l/4 + 8, and in every n8 column group j the columns 8j + 2(l%4) + {0, 1}:
// acc[4j + 2 half + e] = (row 16w + l/4 + 8 half, column 8j + 2(l%4) + e).
struct LanePlace {
  int a1;   // lane bit 0: after the reduce-scatter, the lane keeps row half a1
  int b1;   // lane bit 1: ... and queries 2g + b1 of the group
  int quad; // lane % 4: column offset 2 * quad in every n8 group
  int row;  // key row (0..63) of the warpgroup's block that this lane stores
  __device__ __forceinline__ explicit LanePlace(int thread_in_warpgroup) {
    const int lane = thread_in_warpgroup % 32, warp = thread_in_warpgroup / 32;
    a1 = lane & 1;
    b1 = (lane >> 1) & 1;
    quad = lane & 3;
    row = 16 * warp + (lane >> 2) + 8 * a1;
  }
};

// Head weights this lane multiplies with: w[2j + e] is the weight of column 8j + 2 quad + e,
// i.e. of query (8j) / H of the group and head (8j) % H + 2 quad + e. `row_weights(q)` returns the
// query's [H] weight row or nullptr for a query that does not exist (weights 0).
template <class C, class RowWeights>
__device__ __forceinline__ void load_weights(float (&w)[C::kAccum / 2], int quad,
                                             RowWeights row_weights) {
#pragma unroll
  for (int q = 0; q < C::kQueriesPerGroup; ++q) {
    const float* row = row_weights(q);
#pragma unroll
    for (int jj = 0; jj < C::kColGroupsPerQuery; ++jj) {
      const int j = q * C::kColGroupsPerQuery + jj;
      const int h = 8 * jj + 2 * quad;
      w[2 * j] = row != nullptr ? __ldg(row + h) : 0.0f;
      w[2 * j + 1] = row != nullptr ? __ldg(row + h + 1) : 0.0f;
    }
  }
}

// sum_h w[q, h] * relu(acc[key, (q, h)]) for the lane's key row and queries: out[g] belongs to
// query 2g + b1 of the group and key row `LanePlace::row`. Fixed summation order: bit-reproducible.
//
// Every thread first folds its own 2 x 2 * kColGroupsPerQuery products per (query, row half) pair
// (head_partial, over n8 groups [kJ0, kJ1), so the two n64 halves can be folded separately); the
// 4 lanes of a quad hold the other columns of the same rows, and a two-step reduce-scatter (xor 2,
// then xor 1) leaves each lane one full sum per query pair, instead of all sums in all lanes: half
// the shuffles, and the quad's 4 lanes then store 4 different outputs.
template <class C>
using PairSums = float[2 * C::kQueriesPerGroup];  // (query, row half) pair p = 2 q + half

template <class C, int kJ0, int kJ1>
__device__ __forceinline__ void head_partial(const float (&acc)[64],
                                             const float (&w)[C::kAccum / 2], PairSums<C>& part) {
#pragma unroll
  for (int j = kJ0; j < kJ1; ++j) {
    const int q = j / C::kColGroupsPerQuery;
    if (j % C::kColGroupsPerQuery == 0) {
      part[2 * q] = 0.0f;
      part[2 * q + 1] = 0.0f;
    }
    part[2 * q] = fmaf(fmaxf(acc[4 * j + 0], 0.0f), w[2 * j], part[2 * q]);
    part[2 * q] = fmaf(fmaxf(acc[4 * j + 1], 0.0f), w[2 * j + 1], part[2 * q]);
    part[2 * q + 1] = fmaf(fmaxf(acc[4 * j + 2], 0.0f), w[2 * j], part[2 * q + 1]);
    part[2 * q + 1] = fmaf(fmaxf(acc[4 * j + 3], 0.0f), w[2 * j + 1], part[2 * q + 1]);
  }
}

template <class C>
__device__ __forceinline__ void quad_reduce_scatter(const PairSums<C>& part, const LanePlace& lp,
                                                    float (&out)[C::kQueriesPerLane]) {
  // Round 1 (lanes differing in bit 1): keep the pairs of queries 2g + b1, send the others.
  float half_sums[C::kQueriesPerGroup];  // m = 2g + a: query 2g + b1, row half a
#pragma unroll
  for (int g = 0; g < C::kQueriesPerLane; ++g) {
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const float even_q = part[4 * g + a], odd_q = part[4 * g + 2 + a];
      const float keep = lp.b1 ? odd_q : even_q;
      const float send = lp.b1 ? even_q : odd_q;
      half_sums[2 * g + a] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, 2);
    }
  }
  // Round 2 (lanes differing in bit 0): keep row half a1.
#pragma unroll
  for (int g = 0; g < C::kQueriesPerLane; ++g) {
    const float keep = lp.a1 ? half_sums[2 * g + 1] : half_sums[2 * g];
    const float send = lp.a1 ? half_sums[2 * g] : half_sums[2 * g + 1];
    out[g] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, 1);
  }
}

template <class C>
__device__ __forceinline__ void head_reduce(const float (&acc)[64], const float (&w)[C::kAccum / 2],
                                            const LanePlace& lp,
                                            float (&out)[C::kQueriesPerLane]) {
  PairSums<C> part;
  head_partial<C, 0, 16>(acc, w, part);
  quad_reduce_scatter<C>(part, lp, out);
}

// The tile range [first item, first tile in it, tile count) of this CTA: item i has tiles_of(i)
// tiles, and the concatenated list of all tiles is cut into gridDim.x equal runs (an item may be
// split between CTAs). Every thread of the CTA must call it (it synchronises the block); tiles_of
// must be the same pure function of device data for every caller.
struct TileRange {
  int64_t item;
  int64_t first_tile;
  int64_t count;
};

template <int kThreads, class TilesOf>
__device__ __forceinline__ TileRange balanced_range(int64_t num_items, TilesOf tiles_of,
                                                    int64_t* scratch) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps + 3 <= 32, "scratch");  // + total, 2 results
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Thread tid sums a contiguous run of items, so the loads are independent (no barrier between).
  const int64_t per = ceil_div<int64_t>(num_items, kThreads);
  const int64_t begin = cmin<int64_t>(num_items, tid * per);
  const int64_t end = cmin<int64_t>(num_items, begin + per);
  int64_t mine = 0;
  for (int64_t i = begin; i < end; ++i) mine += tiles_of(i);

  int64_t incl = mine;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int64_t other = __shfl_up_sync(0xFFFFFFFFu, incl, d);
    if (lane >= d) incl += other;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (tid == 0) {
    int64_t run = 0;
    for (int i = 0; i < kWarps; ++i) {
      const int64_t t = scratch[i];
      scratch[i] = run;
      run += t;
    }
    scratch[kWarps] = run;
  }
  __syncthreads();
  const int64_t excl = scratch[warp] + incl - mine;
  const int64_t total = scratch[kWarps];
  const int64_t t0 = total * blockIdx.x / gridDim.x;
  const int64_t t1 = total * (blockIdx.x + 1) / gridDim.x;
  TileRange r;
  if (t0 < t1 && excl <= t0 && t0 < excl + mine) {
    int64_t seen = excl;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = tiles_of(i);
      if (t0 < seen + n) {
        scratch[kWarps + 1] = i;
        scratch[kWarps + 2] = t0 - seen;
        break;
      }
      seen += n;
    }
  }
  __syncthreads();
  r.count = t1 - t0;
  r.item = r.count > 0 ? scratch[kWarps + 1] : 0;
  r.first_tile = r.count > 0 ? scratch[kWarps + 2] : 0;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Host helpers

// The compiled (heads, head dim) configurations, params.h's kIndexerHeads x kIndexerHeadDims:
// calls launch(std::integral_constant<int, H>, std::integral_constant<int, D>).
template <class Launch>
cudaError_t dispatch_heads_and_dim(int heads, int head_dim, Launch&& launch) {
  using std::integral_constant;
  if (heads == 64 && head_dim == 128) return launch(integral_constant<int, 64>{}, integral_constant<int, 128>{});
  if (heads == 64 && head_dim == 64) return launch(integral_constant<int, 64>{}, integral_constant<int, 64>{});
  if (heads == 32 && head_dim == 128) return launch(integral_constant<int, 32>{}, integral_constant<int, 128>{});
  if (heads == 32 && head_dim == 64) return launch(integral_constant<int, 32>{}, integral_constant<int, 64>{});
  return cudaErrorInvalidValue;
}

}  // namespace indexer_sm90
}  // namespace indexcache
