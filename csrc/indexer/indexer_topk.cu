// Fused lightning-indexer scoring and top-k, ragged prefill form: out[t] holds the k keys of
// [ks[t], ke[t]) with the largest indexer_logits scores (NaN < -inf < ... < +inf, ties to the
// smaller key), -1 padded: in ascending key order, or with sorted in (score desc, key asc) order.
// The [S, N] scores never exist: each query's selection lives in the CTA's shared memory while its
// key tiles stream past.
//
// NOTES:
// - Scoring is indexer_logits's, piece for piece (indexer_ragged.cuh: same producer, MMA, head
//   fold and k_scale product), so a score here is bit-identical to the two-kernel path's and the
//   selected set is exactly topk(indexer_logits(...)).
// - Roles: 4 math warpgroups score tiles as indexer_logits does; the fifth holds the TMA producer
//   warp and 3 selection warps. A math warp tests its 16 keys x 2 queries (H = 64) against each
//   query's floor, and hands the passing ones (order key and row, in key order) to the selection
//   through a ring of staged tiles in shared memory; the selection warps move them into the
//   query's pool and cut the pools. So the selection runs beside the MMA, not on its path: the
//   math warps wait only when the ring is full. (The first version ran the selection on the math
//   warps: 0.67x the two-kernel path; bench/NOTES.md has this one's numbers and profile.)
// - Registers: 640 threads launch at 96. The math warpgroups take 104 (64 accumulators, 32 head
//   weights, the filter) and the producer/selection warpgroup keeps 64:
//   512 x 104 + 128 x 64 = 640 x 96. Both spill a few words (H = 64, D = 128: 64 B; three of the
//   spill instructions sit in the math warps' filter, once per tile).
// - Schedule: whole query groups per CTA (balanced_range with kWholeItems), so a query's selection
//   never leaves its CTA: no workspace, no merge pass. Runs differ by up to one group's tiles,
//   which is why the op takes this kernel only where there are >= kMinGroupsPerSm groups per SM
//   (the bounded-chunk path serves fewer, longer rows).
// - A candidate is the 64-bit (topk_order_key(score) << 32) | ~key: larger means selected first,
//   and candidates of one query are distinct, so "the k largest candidates" is the exact
//   top-k with ties to the smaller key, whatever order they were found in.
// - Floors: a math warp reads its query's floor from shared memory as it is, one 64-bit atomic per
//   query and warp at the end of the tile before the one it filters (the word packs the query
//   group and the floor's order key, so a floor is never taken for the wrong group). The test is
//   order key >= the floor's, which lets the ties at the floor through whatever their key: a
//   weaker floor, still safe. Any floor a cut has set stays valid for the rest of the group (k
//   candidates above it are never dropped), so reading one late only lets more keys through.
//   (Floors handed over in the staged slots, up to a ring's length old, cost ~25 % more cuts and
//   copies in the replay of tests/test_fused_selection_protocol.py.)
// - Pools stay in key order: a tile's lists are copied at offsets from a scan of their counts, and
//   compaction is a stable scan too (no atomics decide positions). The unsorted output is that
//   order, so both outputs are the same on every run.
// - Cuts: when a pool passes its size - 256 entries (one more tile could overflow it), it is cut.
//   Inside a group any floor <= the k-th largest will do, so first a cheap estimate: an order
//   statistic of 64 evenly spaced entries, 2.5 standard deviations on the safe side, kept if one
//   counting pass finds it leaves >= k entries and room for a tile; else (~1 %) and at the group
//   end, the exact radix select over 8-bit digits (a digit stops as soon as its bin is taken
//   whole). The floor becomes the threshold: every later key below it has k better ones already.
//   A pool therefore never overflows and never drops a key that could be selected.
// - Shared memory (D = 128): one Q stage (the next group's Q loads after the current group's last
//   tile, once per ~250 tiles at N = 64K), 3 key stages at H = 64 and 2 at H = 32
//   (indexer_logits: 2 and 5), a pool per query (H = 64: 2 kMaxTopk + 1024 entries, 40 KB; H = 32:
//   kMaxTopk + 1536, 28 KB) with 2 x 1 KB of histograms, and a staging ring of what is left
//   (11 tiles at H = 64, D = 128).
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
constexpr int kMinGroupsPerSm = 8;
constexpr unsigned kFull = 0xFFFFFFFFu;

// The fifth warpgroup: warp 0 drives TMA, warps 1-3 select.
constexpr int kSelectionThreads = 96;
constexpr int kSelectionBarrier = 1;  // named barrier of the selection warps (0 is __syncthreads)
constexpr int kMathRegisters = 104;
constexpr int kSideRegisters = 64;

template <int kPoolEntries_>
struct QuerySelection {
  static constexpr int kPoolEntries = kPoolEntries_;
  unsigned long long pool[kPoolEntries];  // candidates in ascending key order
  uint32_t hist[2][kBins];                // radix select; the cut's sample reuses hist[0]
  // (query group << 32) | the floor's order key; read and written with atomics only.
  unsigned long long live_floor;
  unsigned long long pad;                 // sizeof a multiple of 16 (alignment)
};

// Shared scratch of the selection warps (one select or cut at a time).
struct SelectState {
  unsigned long long prefix;  // radix select: resolved digits of the k-th candidate
  unsigned long long mask;    // ... which bits of prefix are resolved
  uint32_t k_rem;             // ... rank of the k-th candidate among those matching prefix
  uint32_t done;              // ... prefix decides every entry
  unsigned long long sample_threshold;
  uint32_t above;             // cut: entries >= sample_threshold
  uint32_t pad;
  uint32_t round_kept[2][8][4];  // compact: kept entries per [round parity][j][warp]
};

// Pool entries per query: what the shared memory holds beside one Q stage, the key stages and a
// staging ring of >= 4 tiles. A cut frees pool - 256 - (what it keeps), so every entry above
// k + 256 makes cuts rarer.
template <int kHeads>
using Selection = QuerySelection<kHeads == 64 ? 2 * kMaxTopk + 1024 : kMaxTopk + 1536>;

// One tile's candidates as the math warps hand them over: for every (math warp, query) list the
// order keys of the warp's keys (16 consecutive rows) that passed the floor, in key order, with
// their rows.
template <int kQueries>
struct StagedTile {
  static constexpr int kLists = 16 * kQueries;  // list = math warp * kQueries + query
  uint32_t order[kLists][16];
  uint32_t count[kLists];
  uint8_t row[kLists][16];
};

template <int kHeads, int kHeadDim>
struct FusedLayout {
  using Sel = Selection<kHeads>;
  static constexpr int kQueries = 128 / kHeads;
  using Staged = StagedTile<kQueries>;
  static_assert(sizeof(Sel) % 16 == 0 && sizeof(Staged) % 16 == 0, "alignment");
  static constexpr int kTileKeys = 256;
  static constexpr int kCutAbove = Sel::kPoolEntries - kTileKeys;
  static_assert(kCutAbove >= kMaxTopk, "a cut pool must not trigger the next cut");
  static constexpr int kKeyStages = kHeads == 64 ? 3 : 2;
  // One Q stage: the next group's Q then loads after the last tile of the current one (a bubble
  // of one load per ~250 tiles at N = 64K), and its 16 KB go to the pools.
  static constexpr int kQStages = 1;
  static constexpr int kQStageBytes = 128 * kHeadDim;
  static constexpr int kRingBytes = kQStages * kQStageBytes + kKeyStages * kTileKeys * kHeadDim;
  // What Config puts beside its rings and `extra`: alignment slack, barriers, scratch.
  static constexpr int kConfigBytes = 1024 + 8 * (2 * kQStages + 2 * kKeyStages) + 256;
  static constexpr int kFixedBytes = kQueries * int(sizeof(Sel)) + int(sizeof(SelectState));
  static constexpr int kStagingFit =
      (227 * 1024 - kConfigBytes - kRingBytes - kFixedBytes) / (int(sizeof(Staged)) + 16);
  static constexpr int kStagingStages = kStagingFit < 16 ? kStagingFit : 16;
  static_assert(kStagingStages >= 4, "staging ring");
  static constexpr int kExtraBytes =
      kFixedBytes + kStagingStages * (int(sizeof(Staged)) + 16);
  using C = Config<kHeads, kHeadDim, 1, kExtraBytes, kExtraBytes + kRingBytes, kQStages>;
  static_assert(C::kKVStages == kKeyStages, "key stages");
  static_assert(C::kMathThreads / 32 == 16, "16 math warps");
  static_assert(128 * kSideRegisters + C::kMathThreads * kMathRegisters <=
                    C::kThreads * C::kLaunchRegisters, "register pool");

  // Pointers into Config's `extra`: staged tiles, pools, select state, the ring's barriers.
  Staged* staging;
  Sel* sels;
  SelectState* state;
  uint64_t* staged;    // kStagingStages: a tile's candidates are in (kMathThreads arrivals)
  uint64_t* consumed;  // kStagingStages: the selection is done with a tile (every thread)

  __device__ __forceinline__ explicit FusedLayout(uint8_t* extra) {
    staging = reinterpret_cast<Staged*>(extra);
    sels = reinterpret_cast<Sel*>(staging + kStagingStages);
    state = reinterpret_cast<SelectState*>(sels + kQueries);
    staged = reinterpret_cast<uint64_t*>(state + 1);
    consumed = staged + kStagingStages;
  }
};

__device__ __forceinline__ void selection_sync() {
  asm volatile("bar.sync %0, %1;" ::"n"(kSelectionBarrier), "n"(kSelectionThreads) : "memory");
}

__device__ __forceinline__ uint32_t lanes_below() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// The live floors are read and written with atomics (relaxed, CTA scope): a plain relaxed load
// and store say the same to the memory model, but compute-sanitizer's racecheck reports them as
// races and does not report atomics. They cost time: at the headline shape on the H200 6535 us
// with relaxed loads and stores, 6832 with atomics read a tile early (this code), 7091 with
// atomics read at the filter (bench/NOTES.md, session 15).
__device__ __forceinline__ unsigned long long load_atomic(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("atom.relaxed.cta.shared.or.b64 %0, [%1], 0;"
               : "=l"(v) : "r"(smem_addr(p)) : "memory");
  return v;
}

__device__ __forceinline__ void store_atomic(unsigned long long* p, unsigned long long v) {
  asm volatile("atom.relaxed.cta.shared.exch.b64 _, [%0], %1;" ::"r"(smem_addr(p)), "l"(v)
               : "memory");
}

__device__ __forceinline__ unsigned long long live_floor(int group, unsigned long long floor) {
  return (static_cast<unsigned long long>(static_cast<uint32_t>(group)) << 32) | (floor >> 32);
}

// counts[q] for a q known only at run time, without a local-memory array.
template <int kQueries>
__device__ __forceinline__ uint32_t pick(const uint32_t (&counts)[kQueries], int q) {
  uint32_t v = counts[0];
#pragma unroll
  for (int i = 1; i < kQueries; ++i) v = q == i ? counts[i] : v;
  return v;
}

// Keeps the pool entries >= threshold, in their order; returns how many. Rounds of kRound entries
// (thread rank takes entries base + j * 96 + rank, so (j, warp, lane) is pool order): every warp
// publishes its kept count per j, one barrier, then each entry goes to the number kept before it.
// A round reads its entries before that barrier and writes below its own end, so nothing is
// overwritten before it is read; the counts alternate between two buffers across rounds.
template <class Sel>
__device__ uint32_t compact(Sel& s, SelectState& st, uint32_t n, unsigned long long threshold,
                            int rank) {
  constexpr int kPerThread = 8;
  constexpr int kWarps = kSelectionThreads / 32;
  constexpr uint32_t kRound = kSelectionThreads * kPerThread;
  const int warp = rank / 32;
  uint32_t kept = 0;
  for (uint32_t base = 0, round = 0; base < n; base += kRound, ++round) {
    unsigned long long e[kPerThread];
    uint32_t ballot[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const uint32_t i = base + j * kSelectionThreads + rank;
      e[j] = i < n ? s.pool[i] : 0ull;
      ballot[j] = __ballot_sync(kFull, i < n && e[j] >= threshold);
      if (lane_id() == 0) st.round_kept[round & 1][j][warp] = __popc(ballot[j]);
    }
    selection_sync();
    // Lane l holds the count of (j, w) = (l / kWarps, l % kWarps): one scan gives every offset.
    static_assert(kPerThread * kWarps <= 32, "one count per lane");
    const int lane = lane_id();
    const uint32_t c = lane < kPerThread * kWarps
                           ? st.round_kept[round & 1][lane / kWarps][lane % kWarps] : 0u;
    const uint32_t incl = warp_inclusive_sum(c);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const uint32_t at = kept + __shfl_sync(kFull, incl - c, j * kWarps + warp);
      if (ballot[j] >> lane & 1) s.pool[at + __popc(ballot[j] & lanes_below())] = e[j];
    }
    kept += __shfl_sync(kFull, incl, 31);
  }
  selection_sync();  // the last round's writes before anyone reads the pool
  return kept;
}

// The radix select: the k-th largest of pool[0, n) (n > k), as the smallest candidate to keep.
template <class Sel>
__device__ unsigned long long kth_largest(Sel& s, SelectState& st, uint32_t n, uint32_t k,
                                          int rank) {
  if (rank == 0) {
    st.prefix = 0;
    st.mask = 0;
    st.k_rem = k;
    st.done = 0;
  }
  for (int i = rank; i < kBins; i += kSelectionThreads) s.hist[0][i] = 0;
  selection_sync();
  // Digits from the top; done once the prefix bin is taken whole.
  for (int pass = 0, shift = 64 - kDigitBits; shift >= 0; ++pass, shift -= kDigitBits) {
    uint32_t* hist = s.hist[pass & 1];
    for (int i = rank; i < kBins; i += kSelectionThreads) s.hist[(pass + 1) & 1][i] = 0;
    const unsigned long long mask = st.mask, prefix = st.prefix;
    // kCountBatch entries per thread per round, loads and matches first: a match's latency
    // then overlaps the others'.
    constexpr int kCountBatch = 4;
    for (uint32_t i0 = 0; i0 < n; i0 += kCountBatch * kSelectionThreads) {
      uint32_t bin[kCountBatch], peers[kCountBatch];
#pragma unroll
      for (int j = 0; j < kCountBatch; ++j) {
        const uint32_t i = i0 + j * kSelectionThreads + rank;
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
    selection_sync();
    if (rank < 32) {
      // Lane l holds bins 255 - 8 l .. 248 - 8 l (from the top); the one where the running count
      // from the top reaches k_rem is the k-th candidate's digit.
      const int lane = rank;
      uint32_t c[kBins / 32], total = 0;
#pragma unroll
      for (int j = 0; j < kBins / 32; ++j) {
        c[j] = hist[kBins - 1 - (kBins / 32) * lane - j];
        total += c[j];
      }
      const uint32_t incl = warp_inclusive_sum(total);
      const uint32_t k_rem = st.k_rem;
      __syncwarp();  // every lane has read k_rem before the finding lane rewrites it (racecheck)
      if (incl - total < k_rem && k_rem <= incl) {
        uint32_t above = incl - total;
#pragma unroll
        for (int j = 0; j < kBins / 32; ++j) {
          if (above + c[j] >= k_rem) {
            const uint32_t bin = uint32_t(kBins - 1 - (kBins / 32) * lane - j);
            st.prefix |= static_cast<unsigned long long>(bin) << shift;
            st.mask |= static_cast<unsigned long long>(kBins - 1) << shift;
            st.k_rem = k_rem - above;
            st.done = c[j] == k_rem - above ? 1u : 0u;
            break;
          }
          above += c[j];
        }
      }
    }
    selection_sync();
    if (st.done) break;
  }
  // Entries whose resolved digits are >= the prefix are exactly the k largest, and for those
  // digits (c & mask) >= prefix is the same as c >= prefix.
  const unsigned long long kth = st.prefix;
  selection_sync();  // every thread has read the state before it is reused
  return kth;
}

// Cuts pool s (n > k entries) to its k largest candidates and raises its floor; returns the new
// count. Exact (the radix select) where the pool must hold exactly k (group end); in the loop any
// floor <= the k-th largest will do, so first a cheap one: the sample_rank-th largest of 64
// evenly spaced entries, checked by one counting pass, and the radix select only when it keeps
// fewer than k (a high estimate) or the pool is too small for a sample to pay.
template <int kTileKeys, class Sel>
__device__ uint32_t cut(Sel& s, SelectState& st, uint32_t n, uint32_t k, bool exact, int group,
                        int rank) {
  constexpr int kSample = 64;
  unsigned long long threshold = 0;
  bool found = false;
  // Rank (0 = largest) of the estimate in the sample: mean + 2.5 standard deviations of the
  // sample count above the k-th largest, so the estimate keeps fewer than k ~1 % of the time.
  const float p = float(k) / float(n);
  const int sample_rank =
      int(kSample * p + 2.5f * sqrtf(kSample * p * (1.0f - p)) + 1.0f);
  if (!exact && sample_rank < kSample - 4) {
    auto* sample = reinterpret_cast<unsigned long long*>(s.hist[0]);
    unsigned long long mine = 0;
    if (rank < kSample) {
      mine = s.pool[uint32_t((uint64_t(rank) * n) / kSample)];
      sample[rank] = mine;
    }
    if (rank == 0) st.above = 0;
    selection_sync();
    if (rank < kSample) {
      int larger = 0;
#pragma unroll 8
      for (int j = 0; j < kSample; ++j) larger += sample[j] > mine ? 1 : 0;
      if (larger == sample_rank) st.sample_threshold = mine;  // sample entries are distinct
    }
    selection_sync();
    threshold = st.sample_threshold;
    uint32_t above = 0;
    for (uint32_t i = rank; i < n; i += kSelectionThreads) above += s.pool[i] >= threshold ? 1 : 0;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) above += __shfl_xor_sync(kFull, above, o);
    if (lane_id() == 0) atomicAdd(&st.above, above);
    selection_sync();
    // Valid when it keeps at least k; worth it only when it leaves room for the next tile.
    found = st.above >= k && st.above <= n - kTileKeys;
    selection_sync();  // st.above read by all before a later cut resets it
  }
  if (!found) threshold = kth_largest(s, st, n, k, rank);
  if (rank == 0 && !exact) store_atomic(&s.live_floor, live_floor(group, threshold));
  return compact(s, st, n, threshold, rank);
}

// Sorts pool[0, m) descending (m = k rounded up to a power of two; entries from n on are 0, below
// every candidate). All selection threads together.
template <class Sel>
__device__ void sort_pool(Sel& s, uint32_t n, uint32_t m, int rank) {
  for (uint32_t i = n + rank; i < m; i += kSelectionThreads) s.pool[i] = 0;
  selection_sync();
  for (uint32_t size = 2; size <= m; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t i = rank; i < m / 2; i += kSelectionThreads) {
        const uint32_t lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const unsigned long long a = s.pool[lo], b = s.pool[hi];
        if ((a < b) == descending) {
          s.pool[lo] = b;
          s.pool[hi] = a;
        }
      }
      selection_sync();
    }
  }
}

// Moves one staged tile's candidates into the pools, in key order, and adds them to counts[]
// (the same in every thread). Every warp scans the list counts itself (lane i: list i, and
// i + 32 at H = 32), so no barrier is needed; lane i then copies entries warp, warp + 3, ... of
// its lists.
template <class L>
__device__ __forceinline__ void copy_tile(const L& layout, const typename L::Staged& slot,
                                          int first_key, uint32_t (&counts)[L::kQueries],
                                          int rank) {
  constexpr int kQ = L::kQueries;
  constexpr int kListsPerLane = L::Staged::kLists / 32;
  const int lane = lane_id(), warp = rank / 32, q = lane % kQ;
  uint32_t before[kListsPerLane], n[kListsPerLane], run = 0;
#pragma unroll
  for (int h = 0; h < kListsPerLane; ++h) {
    n[h] = slot.count[lane + 32 * h];
    // Inclusive scan over the lists of the lane's query (lanes q, q + kQ, ...): list order is
    // math-warp order, which is key order.
    uint32_t incl = n[h];
#pragma unroll
    for (int d = kQ; d < 32; d *= 2) {
      const uint32_t v = __shfl_up_sync(kFull, incl, d);
      if (lane >= d) incl += v;
    }
    before[h] = run + incl - n[h];
    run += __shfl_sync(kFull, incl, 32 - kQ + q);  // the query's total over this half
  }
  const uint32_t base = pick(counts, q);
  auto& s = layout.sels[q];
#pragma unroll
  for (int h = 0; h < kListsPerLane; ++h) {
    const int list = lane + 32 * h;
    const int key0 = first_key + 16 * (list / kQ);
    for (uint32_t i = warp; i < n[h]; i += kSelectionThreads / 32) {
      const int key = key0 + slot.row[list][i];
      s.pool[base + before[h] + i] = (static_cast<unsigned long long>(slot.order[list][i]) << 32) |
                                     static_cast<uint32_t>(~static_cast<uint32_t>(key));
    }
  }
#pragma unroll
  for (int i = 0; i < kQ; ++i) counts[i] += __shfl_sync(kFull, run, i);
}

// The selection warps' walk over the CTA's range, tile for tile behind the math warpgroups.
template <class L>
__device__ void select_range(const IndexerTopkParams& tp, const TileRange& range, const L& layout,
                             int rank) {
  const IndexerLogitsParams& p = tp.scores;
  const uint32_t k = uint32_t(tp.k);
  uint32_t sort_size = 1;
  while (sort_size < k) sort_size <<= 1;
  SelectState& st = *layout.state;
  int staged = 0;
  int group = static_cast<int>(range.item), first = static_cast<int>(range.first_tile);
  int left = static_cast<int>(range.count);
  while (left > 0) {
    const GroupKeys keys = group_keys<typename L::C>(p, group);
    const int take = min(keys.tiles - first, left);
    if (take > 0) {
      if (rank < L::kQueries) store_atomic(&layout.sels[rank].live_floor, live_floor(group, 0));
      uint32_t counts[L::kQueries];
#pragma unroll
      for (int q = 0; q < L::kQueries; ++q) counts[q] = 0;
      selection_sync();
      for (int t = first; t < first + take; ++t) {
        const Ring<L::kStagingStages> r(staged++);
        Barrier::wait(&layout.staged[r.stage], r.phase);
        auto& slot = layout.staging[r.stage];
        copy_tile(layout, slot, keys.lo + t * L::kTileKeys, counts, rank);
        // Every selection thread arrives: racecheck orders a thread's reads before another's
        // writes through an mbarrier only for the arriving thread's own accesses.
        Barrier::arrive(&layout.consumed[r.stage]);
        if (t + 1 < keys.tiles) {
#pragma unroll
          for (int q = 0; q < L::kQueries; ++q) {
            if (counts[q] > uint32_t(L::kCutAbove)) {
              selection_sync();  // every warp's copies have landed
              counts[q] = cut<L::kTileKeys>(layout.sels[q], st, counts[q], k, false, group, rank);
            }
          }
        }
      }
      selection_sync();  // the last tile's copies have landed
      // Group end: each pool to k, in key order (or sorted), written.
#pragma unroll 1
      for (int q = 0; q < L::kQueries; ++q) {
        auto& s = layout.sels[q];
        uint32_t n = pick(counts, q);
        if (n > k) n = cut<L::kTileKeys>(s, st, n, k, true, group, rank);
        if (tp.sorted) sort_pool(s, n, sort_size, rank);
        const int64_t t = int64_t(group) * L::kQueries + q;
        if (t < p.S) {
          int32_t* row = tp.out + t * tp.out_row_stride;
          for (uint32_t i = rank; i < k; i += kSelectionThreads) {
            row[i] = i < n ? int32_t(~static_cast<uint32_t>(s.pool[i])) : -1;
          }
        }
      }
      selection_sync();  // the pools' reads are done before the next group resets them
      left -= take;
    }
    first = 0;
    ++group;
  }
}

template <int kHeads, int kHeadDim>
__global__ void __launch_bounds__(FusedLayout<kHeads, kHeadDim>::C::kThreads, 1)
    indexer_topk_kernel(const IndexerTopkParams tp, const __grid_constant__ CUtensorMap tmap_q,
                        const __grid_constant__ CUtensorMap tmap_k) {
  using L = FusedLayout<kHeads, kHeadDim>;
  using C = typename L::C;
  const IndexerLogitsParams& p = tp.scores;
  extern __shared__ uint8_t smem_raw[];
  const SmemLayout<C> smem(smem_raw);
  const L layout(smem.extra);
  if (threadIdx.x == 0) {
    for (int i = 0; i < L::kStagingStages; ++i) {
      Barrier::init(&layout.staged[i], C::kMathThreads);
      Barrier::init(&layout.consumed[i], kSelectionThreads);
    }
    for (int q = 0; q < L::kQueries; ++q) layout.sels[q].live_floor = live_floor(-1, 0);
    smem.init_barriers();  // fences every init above too
  }

  const int num_groups = num_query_groups<C>(p);
  const TileRange range = ragged_range<C, true>(p, smem.scratch);

  if (threadIdx.x >= C::kMathThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kSideRegisters>();
    const int side = threadIdx.x - C::kMathThreads;
    if (side == 0) produce_ragged<C>(p, range, smem, &tmap_q, &tmap_k);
    if (side >= 32) select_range(tp, range, layout, side - 32);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kMathRegisters>();
  const LanePlace lp(threadIdx.x % 128);

  // Groups without tiles (every window empty) are never scheduled: pad their rows here.
  for (int group = blockIdx.x; group < num_groups; group += gridDim.x) {
    if (group_keys<C>(p, group).tiles > 0) continue;
    for (int q = 0; q < C::kQueriesPerGroup; ++q) {
      const int64_t t = int64_t(group) * C::kQueriesPerGroup + q;
      if (t >= p.S) break;
      int32_t* row = tp.out + t * tp.out_row_stride;
      for (int i = threadIdx.x; i < tp.k; i += C::kMathThreads) row[i] = -1;
    }
  }

  // The math warps filter: a key goes to the selection only if its order key is >= its query's
  // floor (see NOTES: any floor the selection has set for the group is safe to read, late or not).
  const int n_keys = static_cast<int>(p.N);
  int staged = 0;
  // The floors a tile filters with, read (one atomic per query and warp: lanes 0 and 2 hold
  // b1 = 0 and 1) at the end of the tile before, so the read's latency is off the filter's path.
  // A word of another group (or the 0 it starts as) means no floor.
  unsigned long long floor_word[C::kQueriesPerLane];
#pragma unroll
  for (int g = 0; g < C::kQueriesPerLane; ++g) floor_word[g] = 0;
  float acc[C::kAccum];
  consume_ragged<C>(
      p, range, smem, lp, acc, [](const LaneGroup<C>&) {},
      [&](const LaneGroup<C>& lg, int, int key, const float (&score)[C::kQueriesPerLane]) {
        const Ring<L::kStagingStages> r(staged++);
        Barrier::wait(&layout.consumed[r.stage], r.phase ^ 1);
        auto& slot = layout.staging[r.stage];
#pragma unroll
        for (int g = 0; g < C::kQueriesPerLane; ++g) {
          const int q = 2 * g + lp.b1;
          const unsigned long long live = __shfl_sync(kFull, floor_word[g], lp.b1 * 2);
          const uint32_t floor = uint32_t(live >> 32) == uint32_t(lg.group) ? uint32_t(live) : 0u;
          const uint32_t order = topk_order_key(score[g]);
          const bool take = lg.query[g] >= 0 && key < n_keys && key >= lg.win[g].begin &&
                            key < lg.win[g].end && order >= floor;
          // The warp's 16 rows of query q: lanes with a1 = 0 hold rows 0-7, a1 = 1 rows 8-15.
          const uint32_t mine = __ballot_sync(kFull, take) & (lp.b1 ? 0xCCCCCCCCu : 0x33333333u);
          const uint32_t low_rows = mine & 0x55555555u;
          const uint32_t at = lp.a1 ? __popc(low_rows) + __popc(mine & ~low_rows & lanes_below())
                                    : __popc(low_rows & lanes_below());
          const int list = int(threadIdx.x / 32) * L::kQueries + q;
          if (take) {
            slot.order[list][at] = order;
            slot.row[list][at] = uint8_t(lp.row % 16);
          }
          if ((lane_id() & ~2) == 0) slot.count[list] = __popc(mine);
        }
        Barrier::arrive(&layout.staged[r.stage]);
        if ((lane_id() & ~2) == 0) {
#pragma unroll
          for (int g = 0; g < C::kQueriesPerLane; ++g) {
            floor_word[g] = load_atomic(&layout.sels[2 * g + lp.b1].live_floor);
          }
        }
      },
      [](const LaneGroup<C>&) {});
}

template <int kHeads, int kHeadDim>
cudaError_t launch(const IndexerTopkParams& tp, cudaStream_t stream) {
  using C = typename FusedLayout<kHeads, kHeadDim>::C;
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
