// Fused lightning-indexer scoring and top-k, ragged prefill form: out[t] holds the k keys of
// [ks[t], ke[t]) with the largest indexer_logits scores (NaN < -inf < ... < +inf, ties to the
// smaller key), ordered by (score desc, key asc), -1 padded. The [S, N] scores never exist: each
// query's selection lives in the CTA's shared memory while its key tiles stream past.
//
// NOTES:
// - Scoring is indexer_logits's, piece for piece (indexer_ragged.cuh: same producer, MMA, head
//   fold and k_scale product), so a score here is bit-identical to the two-kernel path's and the
//   selected set is exactly topk(indexer_logits(...)).
// - Schedule: whole query groups per CTA (balanced_range with kWholeItems), so a query's selection
//   never leaves its CTA: no workspace, no merge pass. Runs differ by up to one group's tiles,
//   which is why the op takes this kernel only where there are >= kMinGroupsPerSm groups per SM
//   (the bounded-chunk path serves fewer, longer rows).
// - A candidate is the 64-bit (topk_order_key(score) << 32) | ~key: larger means selected first,
//   and candidates of one query are distinct, so "the k largest candidates" is the exact
//   top-k with ties to the smaller key, whatever order they were found in.
// - Per query: a pool of candidates and a floor. A lane appends (warp-aggregated smem
//   atomics) every visible key whose candidate is >= the floor. Every kSyncTiles tiles the math
//   warpgroups meet at one barrier (bar.red.or: did any pool pass its size - kSyncTiles * 256
//   entries?); if so, every pool above k entries is cut to its k largest by a radix select over
//   8-bit digits of the candidate (most often 3-4 passes: a digit stops as soon as its bin is
//   taken whole), and the floor becomes the selected prefix: every later key below it has k
//   better ones already. A pool therefore never overflows and never drops a key that could be
//   selected.
// - Group end: the same select cuts the pool to k, a bitonic sort orders it, and the keys are
//   written; order and set depend on the scores only, never on timing (atomics decide where an
//   entry sits in the pool, which the sort erases).
// - Shared memory per query: a pool (H = 64: 2 kMaxTopk entries, 32 KB; H = 32, 4 queries per
//   group: kMaxTopk + 1024, 24 KB) and 2 x 1 KB histograms (double-buffered across digits so one
//   barrier per digit suffices). What is left holds 3 key stages at H = 64, D = 128 and 2 at
//   H = 32, D = 128 (indexer_logits: 5).
// - Cost (H200, S = 4096, N = 65536, bench/NOTES.md): 7980 us against 5380 us for indexer_logits
//   + topk. Selection runs on the math warps while the tensor cores wait: ~7 cuts per group at
//   ~14 us (two 512-thread barriers per digit), a ~33 us sort, and an append path taken by 75 % of
//   warp-tiles (a ballot covers 16 keys, ~11 % of which pass the rising floor): ~210 us per group
//   against ~300 us of MMA. Hence opt-in only; NOTES has what parity would take.
#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/device.h"
#include "indexcache/numeric.h"
#include "indexcache/params.h"
#include "indexcache/warp.h"
#include "indexer/indexer_ragged.cuh"
#include "ops/backends.h"

namespace indexcache {
namespace {

using namespace indexer_sm90;

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kSyncTiles = 4;
constexpr int kMinGroupsPerSm = 8;
constexpr unsigned kFull = 0xFFFFFFFFu;

template <int kPoolEntries_>
struct QuerySelection {
  static constexpr int kPoolEntries = kPoolEntries_;
  unsigned long long pool[kPoolEntries];
  uint32_t hist[2][kBins];
  unsigned long long prefix;  // resolved digits of the k-th candidate (select)
  unsigned long long mask;    // which bits of prefix are resolved
  unsigned long long floor;   // append iff candidate >= floor
  uint32_t count;             // entries in pool
  uint32_t kept;              // compaction write cursor
  uint32_t k_rem;             // select: rank of the k-th candidate among those matching prefix
  uint32_t done;              // select: prefix decides every entry
};

// Pool entries per query: room for k plus what kSyncTiles tiles can append. H = 64 (2 queries per
// group) can afford twice k, so its pools are cut less often; H = 32 (4 queries) cannot.
template <int kHeads>
using Selection = QuerySelection<kHeads == 64 ? 2 * kMaxTopk : kMaxTopk + kSyncTiles * 256>;

template <int kHeads, int kHeadDim>
using FusedConfig = Config<kHeads, kHeadDim, 1, (128 / kHeads) * int(sizeof(Selection<kHeads>)),
                           224 * 1024>;

__device__ __forceinline__ unsigned long long candidate(float score, int key) {
  return (static_cast<unsigned long long>(topk_order_key(score)) << 32) |
         static_cast<uint32_t>(~static_cast<uint32_t>(key));
}

// Named barrier 1 over the math warpgroups (the producer warpgroup never joins).
template <class C>
__device__ __forceinline__ void math_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(C::kMathThreads) : "memory");
}

template <class C>
__device__ __forceinline__ bool math_sync_any(bool pred) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, %2, p;\n"
      " selp.u32 %0, 1, 0, q;\n}"
      : "=r"(any)
      : "r"(uint32_t(pred)), "n"(C::kMathThreads)
      : "memory");
  return any != 0;
}

__device__ __forceinline__ uint32_t lanes_below() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Warp-aggregated append of `value` where `take` holds; returns the cursor after the warp's
// appends (the same in every lane).
__device__ __forceinline__ uint32_t warp_append(bool take, unsigned long long value,
                                                uint32_t* cursor, unsigned long long* dst) {
  const uint32_t m = __ballot_sync(kFull, take);
  if (m == 0) return 0;
  const int leader = __ffs(m) - 1;
  uint32_t base = 0;
  if (lane_id() == leader) base = atomicAdd(cursor, uint32_t(__popc(m)));
  base = __shfl_sync(kFull, base, leader);
  if (take) dst[base + __popc(m & lanes_below())] = value;
  return base + __popc(m);
}

// The math threads split into one team of kTeam threads per query of the group.
template <class C>
struct Team {
  static constexpr int kTeam = C::kMathThreads / C::kQueriesPerGroup;
  static_assert(kTeam % 32 == 0, "a warp serves one query");
  int query;  // in the group
  int rank;   // in the team
  __device__ __forceinline__ Team() : query(threadIdx.x / kTeam), rank(threadIdx.x % kTeam) {}
};

// Cuts every pool of the group holding more than k entries to its k largest candidates and
// raises its floor. Called by all math threads together, with no append in flight.
template <class C, class Sel>
__device__ void select_k(Sel* sels, const Team<C>& team, uint32_t k) {
  constexpr int kTeam = Team<C>::kTeam;
  Sel& s = sels[team.query];
  const uint32_t n = s.count;
  const bool active = n > k;
  if (team.rank == 0) {
    s.prefix = 0;
    s.mask = 0;
    s.k_rem = k;
    s.kept = 0;
    s.done = active ? 0u : 1u;
  }
  for (int i = team.rank; i < kBins; i += kTeam) s.hist[0][i] = 0;
  math_sync<C>();

  // Digits from the top; a query is done once its prefix bin is taken whole.
  for (int pass = 0, shift = 64 - kDigitBits; shift >= 0; ++pass, shift -= kDigitBits) {
    bool all_done = true;
#pragma unroll
    for (int q = 0; q < C::kQueriesPerGroup; ++q) all_done &= sels[q].done != 0;
    if (all_done) break;
    const bool counting = s.done == 0;
    uint32_t* hist = s.hist[pass & 1];
    for (int i = team.rank; i < kBins; i += kTeam) s.hist[(pass + 1) & 1][i] = 0;
    if (counting) {
      const unsigned long long mask = s.mask, prefix = s.prefix;
      // kCountBatch entries per thread per round, loads and matches first: a match's latency
      // (the loop's critical path, ncu) then overlaps the others'.
      constexpr int kCountBatch = 4;
      for (uint32_t i0 = 0; i0 < n; i0 += kCountBatch * kTeam) {
        uint32_t bin[kCountBatch], peers[kCountBatch];
#pragma unroll
        for (int j = 0; j < kCountBatch; ++j) {
          const uint32_t i = i0 + j * kTeam + team.rank;
          bin[j] = kBins;  // no entry, or not under the prefix
          if (i < n) {
            const unsigned long long c = s.pool[i];
            if ((c & mask) == prefix) bin[j] = uint32_t(c >> shift) & (kBins - 1);
          }
        }
        // Candidates crowd few bins in the top digits: one atomic per distinct bin per warp.
#pragma unroll
        for (int j = 0; j < kCountBatch; ++j) peers[j] = __match_any_sync(kFull, bin[j]);
#pragma unroll
        for (int j = 0; j < kCountBatch; ++j) {
          if (bin[j] < kBins && __ffs(peers[j]) - 1 == lane_id()) {
            atomicAdd(&hist[bin[j]], uint32_t(__popc(peers[j])));
          }
        }
      }
    }
    math_sync<C>();
    if (counting && team.rank < 32) {
      // Lane l holds bins 255 - 8 l .. 248 - 8 l (from the top); the one where the running count
      // from the top reaches k_rem is the k-th candidate's digit.
      const int lane = team.rank;
      uint32_t c[kBins / 32], total = 0;
#pragma unroll
      for (int j = 0; j < kBins / 32; ++j) {
        c[j] = hist[kBins - 1 - (kBins / 32) * lane - j];
        total += c[j];
      }
      const uint32_t incl = warp_inclusive_sum(total);
      const uint32_t k_rem = s.k_rem;
      __syncwarp();  // every lane has read k_rem before the finding lane rewrites it (racecheck)
      if (incl - total < k_rem && k_rem <= incl) {
        uint32_t above = incl - total;
#pragma unroll
        for (int j = 0; j < kBins / 32; ++j) {
          if (above + c[j] >= k_rem) {
            const uint32_t bin = uint32_t(kBins - 1 - (kBins / 32) * lane - j);
            s.prefix |= static_cast<unsigned long long>(bin) << shift;
            s.mask |= static_cast<unsigned long long>(kBins - 1) << shift;
            s.k_rem = k_rem - above;
            s.done = c[j] == k_rem - above ? 1u : 0u;
            break;
          }
          above += c[j];
        }
      }
    }
    math_sync<C>();
  }

  // Keep the entries >= the prefix: exactly k. Round r reads entries [r R, (r + 1) R) into
  // registers before anyone writes, and writes go below (r + 1) R: no entry is overwritten
  // before it is read.
  constexpr int kPerThread = 8;
  constexpr uint32_t kRound = kTeam * kPerThread;
  uint32_t n_max = 0;
#pragma unroll
  for (int q = 0; q < C::kQueriesPerGroup; ++q) {
    n_max = max(n_max, sels[q].count > k ? sels[q].count : 0u);
  }
  const unsigned long long mask = s.mask, prefix = s.prefix;
  for (uint32_t base = 0; base < n_max; base += kRound) {
    unsigned long long e[kPerThread];
    bool keep[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const uint32_t i = base + j * kTeam + team.rank;
      keep[j] = active && i < n;
      e[j] = keep[j] ? s.pool[i] : 0ull;
      keep[j] = keep[j] && (e[j] & mask) >= prefix;
    }
    math_sync<C>();
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) warp_append(keep[j], e[j], &s.kept, s.pool);
  }
  math_sync<C>();
  if (active && team.rank == 0) {
    s.count = s.kept;
    s.floor = prefix;
  }
  math_sync<C>();
}

// Sorts pool[0, m) of the team's query descending (m = k rounded up to a power of two; entries
// from count on are 0, below every candidate). All math threads together.
template <class C, class Sel>
__device__ void sort_pool(Sel& s, const Team<C>& team, uint32_t n, uint32_t m) {
  constexpr int kTeam = Team<C>::kTeam;
  for (uint32_t i = n + team.rank; i < m; i += kTeam) s.pool[i] = 0;
  math_sync<C>();
  for (uint32_t size = 2; size <= m; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t i = team.rank; i < m / 2; i += kTeam) {
        const uint32_t lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const unsigned long long a = s.pool[lo], b = s.pool[hi];
        if ((a < b) == descending) {
          s.pool[lo] = b;
          s.pool[hi] = a;
        }
      }
      math_sync<C>();
    }
  }
}

template <int kHeads, int kHeadDim>
__global__ void __launch_bounds__(FusedConfig<kHeads, kHeadDim>::kThreads, 1)
    indexer_topk_kernel(const IndexerTopkParams tp, const __grid_constant__ CUtensorMap tmap_q,
                        const __grid_constant__ CUtensorMap tmap_k) {
  using C = FusedConfig<kHeads, kHeadDim>;
  using Sel = Selection<kHeads>;
  const IndexerLogitsParams& p = tp.scores;
  extern __shared__ uint8_t smem_raw[];
  const SmemLayout<C> smem(smem_raw);
  auto* sels = reinterpret_cast<Sel*>(smem.extra);
  if (threadIdx.x == 0) smem.init_barriers();
  if (threadIdx.x < C::kQueriesPerGroup) {
    sels[threadIdx.x].count = 0;
    sels[threadIdx.x].floor = 0;
  }

  const int num_groups = num_query_groups<C>(p);
  const TileRange range = ragged_range<C, true>(p, smem.scratch);

  if (threadIdx.x >= C::kMathThreads) {
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegisters>();
    if (threadIdx.x == C::kMathThreads) produce_ragged<C>(p, range, smem, &tmap_q, &tmap_k);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<C::kMathRegisters>();
  const LanePlace lp(threadIdx.x % 128);
  const Team<C> team;
  const uint32_t k = uint32_t(tp.k);
  uint32_t sort_size = 1;
  while (sort_size < k) sort_size <<= 1;

  // Groups without tiles (every window empty) are never scheduled: pad their rows here.
  for (int group = blockIdx.x; group < num_groups; group += gridDim.x) {
    if (group_keys<C>(p, group).tiles > 0) continue;
    for (int q = 0; q < C::kQueriesPerGroup; ++q) {
      const int64_t t = int64_t(group) * C::kQueriesPerGroup + q;
      if (t >= p.S) break;
      int32_t* row = tp.out + t * tp.out_row_stride;
      for (uint32_t i = threadIdx.x; i < k; i += C::kMathThreads) row[i] = -1;
    }
  }

  const int n_keys = static_cast<int>(p.N);
  constexpr uint32_t kCompactAbove = Sel::kPoolEntries - kSyncTiles * C::kTileKeys;
  static_assert(kCompactAbove >= kMaxTopk, "a cut pool must not trigger the next cut");
  unsigned long long pool_floor[C::kQueriesPerLane];
  bool filling = false;  // this lane saw a pool pass kCompactAbove since the last sync point

  float acc[C::kAccum];
  consume_ragged<C>(
      p, range, smem, lp, acc, [&](const LaneGroup<C>&) {
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) pool_floor[g] = 0;
      },
      [&](const LaneGroup<C>& lg, int t, int key, const float (&score)[C::kQueriesPerLane]) {
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) {
          const bool visible = lg.query[g] >= 0 && key < n_keys && key >= lg.win[g].begin &&
                               key < lg.win[g].end;
          const unsigned long long c = candidate(score[g], key);
          const bool take = visible && c >= pool_floor[g];
          // Lanes of one warp serve queries 2g and 2g + 1 (lane bit 1): one append per query.
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            Sel& s = sels[2 * g + b];
            const uint32_t end = warp_append(take && lp.b1 == b, c, &s.count, s.pool);
            filling |= end > kCompactAbove;
          }
        }
        if ((t + 1) % kSyncTiles == 0 && t + 1 < lg.keys.tiles) {
          if (math_sync_any<C>(filling)) {
            select_k<C>(sels, team, k);
#pragma unroll
            for (int g = 0; g < C::kQueriesPerLane; ++g) pool_floor[g] = sels[2 * g + lp.b1].floor;
          }
          filling = false;
        }
      },
      [&](const LaneGroup<C>& lg) {
        math_sync<C>();
        select_k<C>(sels, team, k);
        filling = false;
        Sel& s = sels[team.query];
        const uint32_t n = s.count;
        sort_pool<C>(s, team, n, sort_size);
        if (team.rank == 0) {
          s.count = 0;
          s.floor = 0;
        }
        const int64_t t = lg.group * C::kQueriesPerGroup + team.query;
        if (t < p.S) {
          int32_t* row = tp.out + t * tp.out_row_stride;
          for (uint32_t i = team.rank; i < k; i += Team<C>::kTeam) {
            row[i] = i < n ? int32_t(~static_cast<uint32_t>(s.pool[i])) : -1;
          }
        }
        math_sync<C>();
      });
}

template <int kHeads, int kHeadDim>
cudaError_t launch(const IndexerTopkParams& tp, cudaStream_t stream) {
  using C = FusedConfig<kHeads, kHeadDim>;
  const IndexerLogitsParams& p = tp.scores;
  return launch_ragged<C>(indexer_topk_kernel<kHeads, kHeadDim>, tp, p, num_query_groups<C>(p),
                          stream);
}

}  // namespace

namespace cuda {

bool indexer_topk_fused_applies(const IndexerTopkParams& p) {
  int sms = 0;
  if (current_device_sms(&sms) != cudaSuccess) return false;
  const int64_t groups = ceil_div<int64_t>(p.scores.S, 128 / p.scores.H);
  return groups >= int64_t{kMinGroupsPerSm} * sms;
}

cudaError_t indexer_topk(const IndexerTopkParams& p, cudaStream_t stream) {
  if (p.scores.S == 0) return cudaSuccess;
  if (p.scores.N == 0) {  // no key at all (and no tensor map over zero rows): every row is -1
    return cudaMemset2DAsync(p.out, size_t(p.out_row_stride) * sizeof(int32_t), 0xFF,
                             size_t(p.k) * sizeof(int32_t), size_t(p.scores.S), stream);
  }
  return indexer_sm90::dispatch_heads_and_dim(p.scores.H, p.scores.D, [&](auto heads, auto dim) {
    return launch<decltype(heads)::value, decltype(dim)::value>(p, stream);
  });
}

}  // namespace cuda
}  // namespace indexcache
