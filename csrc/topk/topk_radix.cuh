// Device pieces of the radix top-k: the warp-level streaming filter, the per-warp candidate lists
// in a shared page pool, the bin search, and the sort of the selection. Torch-free; included by
// topk.cu only, which runs the selection (one CTA, or one thread-block cluster, per row).
//
// NOTES:
// - Work split: a row window is cut into float4 slots; a CTA (cluster rank q) takes a contiguous
//   range of slots and each of its warps a contiguous sub-range (its slice). Warps never wait for
//   one another while streaming: every warp reads its slice in batches of kUnroll float4 loads
//   per lane (the next batch in registers, the one after prefetched into L2 by the TMA unit), keeps
//   the items whose digit 0 (top 11 bits of topk_order_key) is >= the CTA's running bound, and
//   appends them, in index order, to its own list. Lists live in fixed pages of a shared pool,
//   so one warp can hold many candidates (a skewed row) while the others hold few.
// - The first batch of every warp is counted whole, then one cluster barrier: the bound starts
//   from the cluster's counts, so first batches do not flood the pool (for one 128K row over 16
//   CTAs the first batch is the whole row, and the lists receive only the final digit-0 bin and
//   above). When the first batches are only a sample of the window (many rows, one CTA each),
//   the starting bound is estimated from them (the bin above which the sample holds its share
//   of k, with 25 % to spare) instead of proven: a proven bound would start at the sample's k-th
//   item and climb slowly, appending ~3x the candidates over a 128K row (measured 1582 -> 1304
//   us at 4096 x 128K, bench/NOTES.md). An estimate above the k-th key is detected after the
//   stream (the digit-0 search lands below it) and the row is streamed again with proven bounds.
//   When the first batches are the whole window (no warp has a second), that starting search
//   ran over final counts and is the digit-0 search itself (the caller skips a second one).
// - The running bound is a lower bound of the row's k-th key: a bin b such that the digit-0
//   histogram of the candidates counted so far has >= k items in bins >= b. Counts only grow, so
//   a racy read of the histogram (other warps add to it concurrently) still gives a valid bound;
//   a warp raises it (atomicMax) after every kRaiseEvery entries it appended. Items below the
//   bound are never needed: a list is compacted against the bound when it rose, or when the pool is
//   full. The histogram keeps the counts of dropped items, which all sit in bins below the final
//   bound, where no search ever goes (the search starts from the top and stops at the first bin
//   where the suffix count reaches k, which is >= any valid bound).
// - Never a silently wrong set: a warp that cannot get a page even after compacting abandons its
//   list (`global`) and keeps counting its items; the later passes re-read its slice from global
//   memory (and try to collect it into pages again at each refinement level). All decisions are
//   taken on exact counts; the lists are only a cache of the items that can still be selected.
// - Exactness: after the stream, for every bin >= the CTA's final bound, the histogram counts
//   every item of the CTA's range in that bin (an item of such a bin was >= the bound whenever it
//   was seen, and is never dropped). With an estimate E the same holds for the bins >= E only,
//   hence the check that the search lands there. The search over the (cluster-summed)
//   histogram therefore finds the bin of the k-th key exactly; digits 1 (11 bits) and 2 (10 bits)
//   are then histogrammed over the lists' items that share the prefix, and the k-th key T is
//   exact. The output is every key > T plus the first (k - #greater) keys == T in index order.
//   Refinement stops early when the whole prefix bin is taken.
// - Determinism: counts are integers (order-free atomics); write positions come from index-order
//   ranks (warp scans within a slice, slice prefix counts across warps and CTAs), never from
//   atomics. Which pages a list uses and when the bound rises depend on timing, but not the set,
//   its order (ascending column, or (value desc, column asc) when sorted), or the -1 padding.
// - Histogram searches read a 32-group coarse histogram first, so one warp finds a bin with two
//   scans; across a cluster every warp reads a share of the CTAs' counts through distributed
//   shared memory and the shares meet in shared memory (cluster_find). The groups are summed from
//   the fine counts when needed, never kept by atomics: keys crowd a few groups (normal logits:
//   two), where same-address atomics serialise.
// - Loads never leave the window: a slot is read as one float4 only when it lies wholly inside
//   [begin, end); the partial slots at both ends are read item by item.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/numeric.h"
#include "indexcache/params.h"
#include "indexcache/warp.h"

namespace indexcache {
namespace topk_radix {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;  // two CTAs per SM: <= 128 registers, 2 x ~100 KB shared memory
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 8;                          // float4 loads in flight per lane
constexpr int kBatchSlots = kUnroll * kWarpSize;    // 256 slots = 1024 items per warp batch
constexpr int kPageItems = 4 * kWarpSize;           // a page is one step: 4 entries per lane
constexpr int kPages = 64;                          // one bit each in Smem::free_pages
constexpr int kBins = 2048;                         // digits 0 and 1: 11 bits; digit 2: 10 bits
constexpr int kGroups = kWarpSize;                  // coarse histogram: one group per lane
constexpr uint32_t kShift0 = 21;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
// Existence mask of a batch lying wholly inside the window (bit 4 u + c per item): not kFullMask
// unless kUnroll is 8, and batch_candidates returns it unfiltered while the bound is 0.
static_assert(kUnroll * 4 <= 32, "a batch's existence mask is one 32-bit word");
constexpr uint32_t kFullBatchValid = kUnroll * 4 == 32 ? kFullMask : (1u << (kUnroll * 4)) - 1u;
constexpr int kMaxCluster = 16;  // CTAs per row at most (a non-portable cluster size)

struct Smem {
  unsigned long long pool[kPages * kPageItems];  // list entries: (key << 32) | column
  unsigned long long sort[kMaxTopk];             // (key << 32 | ~column) of the selection (rank 0)
  uint32_t hist[2][kBins];                       // double-buffered across refinement levels
  uint32_t groups[2][kGroups];                   // coarse histograms: bin >> (digit bits - 5)
  unsigned long long free_pages;                 // bit p set: page p is free
  uint32_t bound;                                // streaming: digit-0 bound (see stream_slice)
  uint32_t estimate;                             // the sampled bound this pass filtered with, or 0
  uint32_t one_batch;                            // no warp of the cluster has a second batch
  unsigned long long warp_counts[kWarps];        // emission: items at << 32 | items above
  uint32_t found[4];                             // the stream's starting search (publish_found)
  uint32_t gather[2][kWarps][2 * kWarpSize];     // cluster_find: per-warp partial sums
  uint8_t ptab[kWarps][kPages];                  // page table of each warp's list
};

__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }

__device__ __forceinline__ uint32_t byte_of(uint32_t word, int i) {
  return (word >> (8 * i)) & 0xFFu;
}

// The smallest float x with (topk_order_key(x) >> kShift0) >= bin, for bin >= 1: for non-NaN x the
// digit test equals x >= bin_floor(bin) (denormals kept: the kernels are built without -ftz), and
// NaN (key 0, bin 0) fails both. Bins 1..3 hold no key but -inf's (0x007FFFFF).
INDEXCACHE_HOST_DEVICE float bin_floor(uint32_t bin) {
  const uint32_t b = bin << kShift0;
  if (b >= 0x80000000u) return bits_as_float(b & 0x7FFFFFFFu);
  if (b < 0x00800000u) return bits_as_float(0xFF800000u);
  return bits_as_float(~b);
}

// ---- cluster view ----------------------------------------------------------------------------

// The CTAs selecting one row: Q of them, this one has rank q. Q = 1 uses no cluster instruction.
struct ClusterView {
  int Q, q;

  template <class T>
  __device__ T* at(T* p, int rank) const {
    return Q > 1 ? cg::this_cluster().map_shared_rank(p, rank) : p;
  }
  __device__ void sync() const {
    if (Q > 1) {
      cg::this_cluster().sync();
    } else {
      __syncthreads();
    }
  }
};

// ---- a warp's slice of the row ---------------------------------------------------------------

// Float4 slots [lo, hi) of one row: slot j holds columns first + 4j .. first + 4j + 3, of which
// those in [begin, end) exist; slots [full_lo, full_hi) lie wholly inside. Columns < 2^31 (the
// op checks C), so they fit uint32; slot * 4 may not fit int32, hence the 64-bit offsets.
struct Slice {
  const float* row;
  int begin, end, first;
  int lo, hi;
  int full_lo, full_hi;

  __device__ uint32_t column(int slot, int c) const {
    return uint32_t(first) + 4u * uint32_t(slot) + uint32_t(c);
  }
  // Loads one slot (zeros where no item exists); returns the mask of existing items.
  __device__ uint32_t load(int slot, float4& v) const {
    v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (slot >= hi) return 0u;
    const int64_t col0 = int64_t(first) + 4 * int64_t(slot);
    if (slot >= full_lo && slot < full_hi) {
      v = __ldg(reinterpret_cast<const float4*>(row + col0));
      return 0xFu;
    }
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    uint32_t m = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (col0 + c >= begin && col0 + c < end) {
        x[c] = __ldg(row + col0 + c);
        m |= 1u << c;
      }
    }
    v = make_float4(x[0], x[1], x[2], x[3]);
    return m;
  }
  // Whether the batch of slots [s0, s0 + kBatchSlots) lies wholly inside the slice and window.
  __device__ __forceinline__ bool full_batch(int s0) const {
    return s0 >= full_lo && s0 + kBatchSlots <= min(hi, full_hi);
  }
  // Loads slots s0 + 32 u + lane (u < kUnroll) of a full batch.
  __device__ __forceinline__ void load_full_batch(int s0, float4 (&v)[kUnroll]) const {
    const float4* p =
        reinterpret_cast<const float4*>(row + (int64_t(first) + 4 * int64_t(s0))) + lane_id();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(p + u * kWarpSize);
  }
  // Lane 0: asks the TMA unit to bring the batch's whole slots into L2 (one instruction; no
  // registers held while it is in flight).
  __device__ __forceinline__ void prefetch_l2(int s0) const {
    const int a = max(s0, full_lo), e = min(min(s0 + kBatchSlots, hi), full_hi);
    if (e > a) {
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(
                       row + (int64_t(first) + 4 * int64_t(a))),
                   "r"(uint32_t(e - a) * 16u)
                   : "memory");
    }
  }
  // Loads slots s0 + 32 u + lane (u < kUnroll); returns the existence mask, bit 4 u + c.
  __device__ __forceinline__ uint32_t load_batch(int s0, float4 (&v)[kUnroll]) const {
    if (full_batch(s0)) {
      load_full_batch(s0, v);
      return kFullBatchValid;
    }
    uint32_t valid = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      valid |= load(s0 + u * kWarpSize + lane_id(), v[u]) << (4 * u);
    }
    return valid;
  }
};

// Calls f(key[4], col[4], valid) for each step (32 slots; lane holds slot step * 32 + lane) of the
// slice, in index order, with kUnroll steps' loads in flight.
template <class F>
__device__ void for_each_slice_step(const Slice& sl, F&& f) {
  const int lane = lane_id();
  for (int s0 = sl.lo; s0 < sl.hi; s0 += kBatchSlots) {
    float4 v[kUnroll];
    const uint32_t valid = sl.load_batch(s0, v);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (s0 + u * kWarpSize >= sl.hi) break;  // warp-uniform
      const float x[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
      uint32_t key[4], col[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        key[c] = topk_order_key(x[c]);
        col[c] = sl.column(s0 + u * kWarpSize + lane, c);
      }
      f(key, col, (valid >> (4 * u)) & 0xFu);
    }
  }
}

// ---- per-warp candidate lists in the page pool -----------------------------------------------

// Warp-uniform state of one warp's list (registers; the page table is in shared memory).
struct WarpList {
  uint32_t n;       // entries, in index order
  int npages;       // pages held: ptab[warp][0, npages)
  bool global;      // abandoned: the candidates are re-read from the slice
  uint32_t cbound;  // streaming: the bound the list was last compacted against
};

__device__ __forceinline__ uint32_t phys(const Smem& s, uint32_t pos) {
  return uint32_t(s.ptab[warp_id()][pos / kPageItems]) * kPageItems + pos % kPageItems;
}

// Lane 0 only: takes up to `want` free pages into the warp's page table from index `at`; returns
// how many it got (fewer only when the pool ran out). Warps start their search at different bits
// so that they rarely race for the same page.
__device__ int take_pages(Smem& s, int at, int want) {
  const int rot = warp_id() * (kPages / kWarps);
  int got = 0;
  while (got < want) {
    const unsigned long long free = *reinterpret_cast<volatile unsigned long long*>(&s.free_pages);
    if (free == 0) break;
    unsigned long long rotated = rot ? (free >> rot) | (free << (kPages - rot)) : free, pick = 0;
    for (int i = got; i < want && rotated != 0; ++i) {
      pick |= rotated & (~rotated + 1);  // lowest set bit
      rotated &= rotated - 1;
    }
    pick = rot ? (pick << rot) | (pick >> (kPages - rot)) : pick;
    for (unsigned long long mine = atomicAnd(&s.free_pages, ~pick) & pick; mine != 0;
         mine &= mine - 1) {
      s.ptab[warp_id()][at + got++] = uint8_t(__ffsll(static_cast<long long>(mine)) - 1);
    }
  }
  return got;
}

// Makes the list hold pages for `need` entries; false when the pool ran out (pages taken stay).
__device__ bool reserve(Smem& s, WarpList& L, uint32_t need) {
  const int want = int((need + kPageItems - 1) / kPageItems) - L.npages;
  if (want <= 0) return true;
  int got = 0;
  if (lane_id() == 0) got = take_pages(s, L.npages, min(want, kPages - L.npages));
  got = __shfl_sync(kFullMask, got, 0);
  __syncwarp();  // lane 0's page-table writes before any lane's phys()
  L.npages += got;
  return got == want;
}

// Returns the list's pages from index `keep` on to the pool.
__device__ void release_pages(Smem& s, WarpList& L, int keep) {
  __syncwarp();  // every lane is done with the pages
  if (lane_id() == 0 && keep < L.npages) {
    unsigned long long bits = 0;
    for (int j = keep; j < L.npages; ++j) bits |= 1ull << s.ptab[warp_id()][j];
    __threadfence_block();
    atomicOr(&s.free_pages, bits);
  }
  L.npages = min(L.npages, keep);
}

__device__ __forceinline__ void abandon(Smem& s, WarpList& L) {
  release_pages(s, L, 0);
  L.n = 0;
  L.global = true;
}

// Step j of the list (entries 128 j + 4 lane + c); returns the mask of existing entries.
__device__ __forceinline__ uint32_t read_list_step(const Smem& s, const WarpList& L, int j,
                                                   uint32_t (&key)[4], uint32_t (&col)[4]) {
  const uint32_t pos = uint32_t(j) * kPageItems + 4u * uint32_t(lane_id());
  if (pos >= L.n) {
#pragma unroll
    for (int c = 0; c < 4; ++c) key[c] = col[c] = 0;
    return 0u;
  }
  const ulonglong2* p = reinterpret_cast<const ulonglong2*>(
      &s.pool[uint32_t(s.ptab[warp_id()][j]) * kPageItems + 4u * uint32_t(lane_id())]);
  const ulonglong2 a = p[0], b = p[1];
  const unsigned long long e[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    key[c] = uint32_t(e[c] >> 32);
    col[c] = uint32_t(e[c]);
  }
  const uint32_t left = L.n - pos;
  return left >= 4 ? 0xFu : (1u << left) - 1u;
}

// Appends the flagged items (4 per lane, index order lane-major) to the list; false, with nothing
// written, when no page could be had.
__device__ bool append(Smem& s, WarpList& L, const uint32_t (&key)[4], const uint32_t (&col)[4],
                       uint32_t m) {
  const uint32_t cnt = __popc(m);
  const uint32_t incl = warp_inclusive_sum(cnt);
  const uint32_t total = __shfl_sync(kFullMask, incl, kWarpSize - 1);
  if (total == 0) return true;
  if (!reserve(s, L, L.n + total)) return false;
  uint32_t pos = L.n + incl - cnt;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if ((m >> c) & 1u) {
      s.pool[phys(s, pos)] = (static_cast<unsigned long long>(key[c]) << 32) | col[c];
      ++pos;
    }
  }
  __syncwarp();
  L.n += total;
  return true;
}

// In-place, order-keeping compaction of the list to the entries with (key >> shift) >= prefix;
// on_eq(key) is called for each entry with (key >> shift) == prefix. Safe in place: an entry
// only moves down, and a step is wholly read before any lane writes.
template <class OnEq>
__device__ void narrow_list(Smem& s, WarpList& L, uint32_t shift, uint32_t prefix, OnEq&& on_eq) {
  uint32_t kept = 0;
  const int steps = int((L.n + kPageItems - 1) / kPageItems);
  for (int j = 0; j < steps; ++j) {
    uint32_t key[4], col[4];
    const uint32_t valid = read_list_step(s, L, j, key, col);
    uint32_t m = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t d = key[c] >> shift;
      if ((valid >> c) & 1u) {
        m |= uint32_t(d >= prefix) << c;
        if (d == prefix) on_eq(key[c]);
      }
    }
    const uint32_t cnt = __popc(m);
    const uint32_t incl = warp_inclusive_sum(cnt);
    const uint32_t total = __shfl_sync(kFullMask, incl, kWarpSize - 1);
    __syncwarp();
    uint32_t pos = kept + incl - cnt;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if ((m >> c) & 1u) {
        s.pool[phys(s, pos)] = (static_cast<unsigned long long>(key[c]) << 32) | col[c];
        ++pos;
      }
    }
    kept += total;
  }
  L.n = kept;
  release_pages(s, L, int((kept + kPageItems - 1) / kPageItems));
}

// Calls f(key[4], col[4], valid) for each step of the warp's candidates, in index order.
template <class F>
__device__ void for_each_candidate_step(const Smem& s, const WarpList& L, const Slice& sl, F&& f) {
  if (L.global) {
    for_each_slice_step(sl, f);
    return;
  }
  const int steps = int((L.n + kPageItems - 1) / kPageItems);
  for (int j = 0; j < steps; ++j) {
    uint32_t key[4], col[4];
    const uint32_t valid = read_list_step(s, L, j, key, col);
    f(key, col, valid);
  }
}

// ---- bin search ------------------------------------------------------------------------------

struct Found {
  uint32_t bin;      // the bin holding the k_rem-th largest counted item
  uint32_t greater;  // counted items in higher bins (< k_rem)
  uint32_t count;    // items in `bin`
};

// A histogram of 2^bits bins (bits = 10 or 11) is searched from the top in two levels: 32 coarse
// groups of width = 2^(bits - 5) bins, lane l holding group kGroups - 1 - l, then the fine bins
// of the group found, lane l holding bins fine_top(l) and fine_top(l) - 1 (the second only when
// width is 64).
struct GroupHit {
  uint32_t g;      // the group holding the k_rem-th largest counted item
  uint32_t above;  // counted items in higher groups
  uint32_t count;  // items in group g
};

__device__ __forceinline__ uint32_t fine_top(uint32_t g, int bits, int lane) {
  const uint32_t width = 1u << (bits - 5);
  return g * width + width - 1 - uint32_t(lane) * (width / kWarpSize);
}

// Whole warp, coarse level: c is this lane's group count. False when the total is < k_rem.
__device__ __forceinline__ bool find_group(uint32_t c, uint32_t k_rem, GroupHit& h) {
  const uint32_t above_incl = warp_inclusive_sum(c);
  const unsigned hit = __ballot_sync(kFullMask, above_incl >= k_rem);
  if (hit == 0) return false;
  const int gl = __ffs(hit) - 1;
  h = GroupHit{kGroups - 1 - uint32_t(gl), __shfl_sync(kFullMask, above_incl - c, gl),
               __shfl_sync(kFullMask, c, gl)};
  return true;
}

// Whole warp, fine level in group h.g: v0, v1 are this lane's bins fine_top(lane) and the one
// below (v1 = 0 when width is 32). With racy counts the fine level may fall short of the coarse
// one; the group's lowest bin is then returned (still a valid lower bound: its group's counted
// items reach k_rem).
__device__ __forceinline__ Found find_bin(const GroupHit& h, uint32_t v0, uint32_t v1, int bits,
                                          uint32_t k_rem) {
  const uint32_t incl = warp_inclusive_sum(v0 + v1);
  const unsigned hit = __ballot_sync(kFullMask, h.above + incl >= k_rem);
  if (hit == 0) return Found{h.g << (bits - 5), h.above, h.count};
  const int fl = __ffs(hit) - 1;
  const uint32_t before = h.above + __shfl_sync(kFullMask, incl - v0 - v1, fl);
  const uint32_t w0 = __shfl_sync(kFullMask, v0, fl), w1 = __shfl_sync(kFullMask, v1, fl);
  const uint32_t t = fine_top(h.g, bits, fl);
  return before + w0 >= k_rem ? Found{t, before, w0} : Found{t - 1, before + w0, w1};
}

// Whole warp: the search through group(g) (the 32 coarse counts) and bin(b). False when the
// total is < k_rem.
template <class Group, class Bin>
__device__ bool warp_find(Group&& group, Bin&& bin, int bits, uint32_t k_rem, Found& f) {
  const int lane = lane_id();
  GroupHit h;
  if (!find_group(group(kGroups - 1 - lane), k_rem, h)) return false;
  const uint32_t top = fine_top(h.g, bits, lane);
  f = find_bin(h, bin(top), bits == 11 ? bin(top - 1) : 0u, bits, k_rem);
  return true;
}

// Whole CTA, after the histogram `buf` of a digit of `bits` bits is complete (barrier before and
// after, the caller's): its 32 coarse group counts. Computed from the fine counts rather than
// kept by atomics: keys crowd few groups (for normal logits, two), and atomics on so few
// addresses serialise.
__device__ void sum_groups(Smem& s, int buf, int bits) {
  const int width = 1 << (bits - 5);  // bins per group
  const int per = width / (kThreads / kGroups);
  const int g = threadIdx.x / (kThreads / kGroups);
  const int first = g * width + (threadIdx.x % (kThreads / kGroups)) * per;
  uint32_t v = 0;
  for (int i = 0; i < per; ++i) v += s.hist[buf][first + i];
#pragma unroll
  for (int offset = 1; offset < kThreads / kGroups; offset *= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  if (threadIdx.x % (kThreads / kGroups) == 0) s.groups[buf][g] = v;
}

// Whole warp, while the stream runs: the highest valid digit-0 bound the counts seen so far give
// (never below `bound`). Lanes sum their group's 64 bins themselves (groups below the bound's
// cannot hold the answer and count 0), rotating the reads so that lanes hit different banks.
__device__ uint32_t racy_bound(const Smem& s, uint32_t k, uint32_t bound) {
  const int lane = lane_id();
  const uint32_t g = kGroups - 1 - lane;
  uint32_t own = 0;
  if (g >= (bound >> 6)) {
    const uint4* bins = reinterpret_cast<const uint4*>(&s.hist[0][g * 64]);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint4 q = bins[(j + lane) % 16];
      own += q.x + q.y + q.z + q.w;
    }
  }
  const volatile uint32_t* hist = s.hist[0];
  Found f;
  const bool ok = warp_find([&](uint32_t) { return own; }, [&](uint32_t b) { return hist[b]; },
                            11, k, f);
  return ok ? max(f.bin, bound) : bound;
}

// Whole CTA, after sum_groups and a cluster barrier: the search over the sum across the cluster
// of histogram `buf`; every warp of every CTA computes the same answer (across a cluster, two
// barriers inside).
// kRacyBins: other CTAs may still be adding to the fine counts (never below the groups': the bin
// found is still a valid bound). False when the total is < k_rem.
// NOTES: across a cluster, the DSMEM loads of each level are spread over the warps (warp w reads
// ranks w, w + 8) and their partial sums met in shared memory: one warp's DSMEM loads stream at
// ~13 cycles per 128 B (H200), and one warp reading 16 CTAs' groups and bins took ~1.9 us per
// search, all warps sharing it ~0.5 us. A lone CTA has every warp search its own shared memory,
// without barriers.
template <bool kRacyBins>
__device__ bool cluster_find(Smem& s, const ClusterView& cv, int buf, int bits, uint32_t k_rem,
                             Found& f) {
  if (cv.Q == 1) {
    const volatile uint32_t* racy = s.hist[buf];
    return warp_find([&](uint32_t g) { return s.groups[buf][g]; },
                     [&](uint32_t b) { return kRacyBins ? racy[b] : s.hist[buf][b]; }, bits,
                     k_rem, f);
  }
  constexpr int kRanksPerWarp = kMaxCluster / kWarps;
  const int lane = lane_id(), warp = warp_id();
  uint32_t part[kRanksPerWarp];
#pragma unroll
  for (int j = 0; j < kRanksPerWarp; ++j) {
    const int r = warp + j * kWarps;
    part[j] = r < cv.Q ? *cv.at(&s.groups[buf][kGroups - 1 - lane], r) : 0u;
  }
  uint32_t c = 0;
#pragma unroll
  for (int j = 0; j < kRanksPerWarp; ++j) c += part[j];
  s.gather[0][warp][lane] = c;
  __syncthreads();
  c = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) c += s.gather[0][w][lane];
  GroupHit h;
  if (!find_group(c, k_rem, h)) return false;  // the same answer in every warp
  const uint32_t top = fine_top(h.g, bits, lane);
  uint32_t v[kRanksPerWarp][2];
#pragma unroll
  for (int j = 0; j < kRanksPerWarp; ++j) {
    const int r = warp + j * kWarps;
    v[j][0] = v[j][1] = 0;
    if (r < cv.Q) {
      const uint32_t* hist = cv.at(&s.hist[buf][0], r);
      if (kRacyBins) {
        v[j][0] = static_cast<const volatile uint32_t*>(hist)[top];
        if (bits == 11) v[j][1] = static_cast<const volatile uint32_t*>(hist)[top - 1];
      } else {
        v[j][0] = hist[top];
        if (bits == 11) v[j][1] = hist[top - 1];
      }
    }
  }
  uint32_t v0 = 0, v1 = 0;
#pragma unroll
  for (int j = 0; j < kRanksPerWarp; ++j) {
    v0 += v[j][0];
    v1 += v[j][1];
  }
  s.gather[1][warp][lane] = v0;
  s.gather[1][warp][kWarpSize + lane] = v1;
  __syncthreads();
  v0 = v1 = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    v0 += s.gather[1][w][lane];
    v1 += s.gather[1][w][kWarpSize + lane];
  }
  f = find_bin(h, v0, v1, bits, k_rem);
  return true;
}

// One thread: leaves a search's answer in shared memory for the whole CTA (barrier after).
__device__ __forceinline__ void publish_found(Smem& s, const Found& f, bool ok) {
  s.found[0] = f.bin;
  s.found[1] = f.greater;
  s.found[2] = f.count;
  s.found[3] = ok;
}

__device__ __forceinline__ bool published_found(const Smem& s, Found& f) {
  f = Found{s.found[0], s.found[1], s.found[2]};
  return s.found[3] != 0;
}

// Whole CTA, after sum_groups and a cluster barrier: cluster_find over final counts. Returns false
// when the counts cannot answer: a total below k_rem, or (with check_estimate, for digit 0) a bin
// below some CTA's sampled estimate, whose lower bins were not counted (see stream_slice). Never
// false when no CTA used an estimate.
__device__ bool find_in_cluster(Smem& s, const ClusterView& cv, int buf, int bits, uint32_t k_rem,
                                bool check_estimate, Found& f) {
  uint32_t floor = 0;
  if (check_estimate && lane_id() < cv.Q) floor = *cv.at(&s.estimate, lane_id());
  floor = __reduce_max_sync(kFullMask, floor);
  return cluster_find<false>(s, cv, buf, bits, k_rem, f) && f.bin >= floor;
}

// ---- the stream pass -------------------------------------------------------------------------

// Index-order ranks of a batch's flagged items: per step u, the flagged items of lower lanes
// (excl) and of the whole warp (tot), one byte per step (<= 128 each).
struct BatchRanks {
  uint32_t excl[2], tot[2];
  uint32_t total;
};

__device__ __forceinline__ BatchRanks rank_batch(uint32_t m) {
  BatchRanks r;
  r.total = 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      packed |= uint32_t(__popc((m >> (16 * h + 4 * i)) & 0xFu)) << (8 * i);
    }
    const uint32_t incl = warp_inclusive_sum(packed);
    r.excl[h] = incl - packed;
    r.tot[h] = __shfl_sync(kFullMask, incl, kWarpSize - 1);
#pragma unroll
    for (int i = 0; i < 4; ++i) r.total += byte_of(r.tot[h], i);
  }
  return r;
}

// Items of the batch at or above the bound (bound 0: every existing item, NaN included).
__device__ __forceinline__ uint32_t batch_candidates(const float4 (&v)[kUnroll], uint32_t valid,
                                                     uint32_t bound) {
  if (bound == 0) return valid;
  const float t = bin_floor(bound);
  uint32_t m = 0;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    m |= uint32_t(v[u].x >= t) << (4 * u) | uint32_t(v[u].y >= t) << (4 * u + 1) |
         uint32_t(v[u].z >= t) << (4 * u + 2) | uint32_t(v[u].w >= t) << (4 * u + 3);
  }
  return m & valid;
}

__device__ __forceinline__ void count_digit0(Smem& s, uint32_t key) {
  atomicAdd(&s.hist[0][key >> kShift0], 1u);
}

// Whole warp: raises the CTA's bound from the counts seen so far; returns the warp's new bound.
__device__ __forceinline__ uint32_t raise_bound(Smem& s, uint32_t k, uint32_t bound) {
  const uint32_t b = racy_bound(s, k, bound);
  if (b > bound && lane_id() == 0) atomicMax(&s.bound, b);
  return b;
}

__device__ __forceinline__ void compact(Smem& s, WarpList& L, uint32_t bound) {
  narrow_list(s, L, kShift0, bound, [](uint32_t) {});
  L.cbound = bound;
}

// Writes the batch's flagged items, raw value and column, at their index-order positions from
// L.n (pages reserved). Branch-free per item: each lane looks up the (at most two) pages its
// items of a step land on once, through the lane that holds that page id, and stores under a
// predicate; no page-table load per item.
__device__ __forceinline__ void store_batch(Smem& s, const WarpList& L, const Slice& sl, int s0,
                                            const float4 (&v)[kUnroll], uint32_t m,
                                            const BatchRanks& r) {
  const uint32_t lane = uint32_t(lane_id());
  const uint32_t first_page = L.n / kPageItems;
  const uint32_t last_page = (L.n + r.total - 1) / kPageItems;  // <= first_page + 8
  const uint32_t page =
      first_page + lane <= last_page ? uint32_t(s.ptab[warp_id()][first_page + lane]) : 0u;
  uint32_t base = L.n;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const uint32_t step_total = byte_of(r.tot[u / 4], u % 4);
    if (step_total == 0) continue;  // warp-uniform
    const uint32_t pos = base + byte_of(r.excl[u / 4], u % 4);
    const uint32_t rel = pos / kPageItems - first_page;
    const uint32_t lo = __shfl_sync(kFullMask, page, rel) * kPageItems;
    const uint32_t hi = __shfl_sync(kFullMask, page, rel + 1) * kPageItems;
    const float x[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
    uint32_t off = pos % kPageItems;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool take = (m >> (4 * u + c)) & 1u;
      const uint32_t at = off < kPageItems ? lo + off : hi + (off - kPageItems);
      if (take) {
        s.pool[at] = (static_cast<unsigned long long>(__float_as_uint(x[c])) << 32) |
                     sl.column(s0 + u * kWarpSize + int(lane), c);
      }
      off += take;
    }
    base += step_total;
  }
}

// Entries a warp appends between two attempts to raise the CTA's bound from its counts: the
// search costs ~200 instructions, a batch's filter ~300, and with a sampled starting bound the
// counts rarely allow a higher one (4096 x 128K on the H200: 512 is 1 % faster than 256, 128
// 1 % slower).
constexpr uint32_t kRaiseEvery = 512;

// Whole CTA (returns after a barrier): empty histograms, no bound, and a page pool in which warp w
// holds page w (its first append takes no atomic: ~1 us of the one-row path on the H200 went to
// eight warps' lane 0 contending for the free-page word) and the rest are free.
__device__ void reset_stream_state(Smem& s) {
  for (int i = threadIdx.x; i < 2 * kBins; i += kThreads) (&s.hist[0][0])[i] = 0;
  if (threadIdx.x < kWarps) s.ptab[threadIdx.x][0] = uint8_t(threadIdx.x);
  if (threadIdx.x == 0) {
    s.free_pages = ~0ull << kWarps;
    s.bound = 0;
    s.estimate = 0;
  }
  __syncthreads();
}

// Pass 1 of one warp over its slice: counts the digit 0 of every item at or above the running
// bound, and appends those items to the warp's list (see the NOTES at the top). Whole CTA (the
// first batches are counted before a cluster barrier). Leaves the starting search in s.found
// (see publish_found) for the caller.
//
// The starting bound comes from those first batches (the sample): the bin above which the
// cluster's sample holds k_sample items. With k_sample = k it is a proven bound of the k-th key;
// with k_sample < k (the sample is a fraction of the window, k_sample its share of k with a
// margin) it is an estimate, recorded in s.estimate: items below it are neither counted nor kept,
// so the caller's digit-0 search must land at or above every CTA's estimate, or start over with
// k_sample = k (find_in_cluster reports which). An estimate near the final bin saves most of the
// appends and compactions a proven bound needs while it climbs from the sample's k-th item.
// The stream starts with reset_stream_state; when it replaces a pass whose estimate overshot the
// k-th key, only after every CTA of the cluster is done reading this one's histograms.
__device__ void stream_slice(Smem& s, const ClusterView& cv, const Slice& sl, WarpList& L,
                             uint32_t k, uint32_t k_sample) {
  const int lane = lane_id();
  const int batches = sl.hi > sl.lo ? (sl.hi - sl.lo + kBatchSlots - 1) / kBatchSlots : 0;
  // Full batches are loaded into registers one ahead, and the kL2Ahead batches after that into
  // L2 (a warp's 4 KB in flight in registers alone is too little to cover HBM latency at full
  // bandwidth). The partial batches at the window's ends (at most two) are loaded when their
  // turn comes, which keeps the guarded loads out of the register prefetch's pressure.
  // NOTES: 4096 x 128K on the H200 (2026-12-04): kL2Ahead 1 / 2 / 3 -> 1059 / 1097 / 1177 us
  // (4 and 8 were 11-12 % slower than 2 on 2026-12-03).
  constexpr int kL2Ahead = 1;
  float4 cur[kUnroll], nxt[kUnroll];
  uint32_t cur_valid = batches > 0 ? sl.load_batch(sl.lo, cur) : 0u;
  if (batches > 1 && sl.full_batch(sl.lo + kBatchSlots)) {
    sl.load_full_batch(sl.lo + kBatchSlots, nxt);
  }
  if (lane == 0) {
    for (int a = 2; a <= kL2Ahead && a < batches; ++a) sl.prefetch_l2(sl.lo + a * kBatchSlots);
  }
  reset_stream_state(s);  // under the loads' latency
  L = WarpList{0, 1, false, 0};
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const float x[4] = {cur[u].x, cur[u].y, cur[u].z, cur[u].w};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if ((cur_valid >> (4 * u + c)) & 1u) count_digit0(s, topk_order_key(x[c]));
    }
  }
  __syncthreads();
  sum_groups(s, 0, 11);
  cv.sync();
  {
    // The counts are racy while other CTAs count later batches; when no warp has one, they are
    // final and `f` is the digit-0 search itself (see digit0_search).
    Found f{0, 0, 0};
    const bool ok = cluster_find<true>(s, cv, 0, 11, k_sample, f);
    if (threadIdx.x == 0) {
      const uint32_t b = ok ? f.bin : 0u;
      atomicMax(&s.bound, b);
      s.estimate = k_sample < k ? b : 0u;
      publish_found(s, f, ok);
    }
  }
  __syncthreads();
  // The list is empty: it holds nothing below the starting bound.
  uint32_t bound = s.bound;
  L.cbound = bound;
  uint32_t since_raise = 0;  // entries appended (or counted, abandoned) since the last raise
  for (int b = 0; b < batches; ++b) {
    const int s0 = sl.lo + b * kBatchSlots;
    if (lane == 0 && b + 1 + kL2Ahead < batches) sl.prefetch_l2(s0 + (1 + kL2Ahead) * kBatchSlots);
    if (b > 0) {
      if (b + 1 < batches && sl.full_batch(s0 + kBatchSlots)) {
        sl.load_full_batch(s0 + kBatchSlots, nxt);
      }
      cur_valid = sl.full_batch(s0) ? kFullBatchValid : sl.load_batch(s0, cur);
    }
    uint32_t shared_bound = 0;
    if (lane == 0) shared_bound = *reinterpret_cast<volatile uint32_t*>(&s.bound);
    bound = max(bound, __shfl_sync(kFullMask, shared_bound, 0));
    if (!L.global && bound > L.cbound && L.npages > 1) compact(s, L, bound);

    uint32_t m = batch_candidates(cur, cur_valid, bound);
    if (!L.global) {
      BatchRanks r = rank_batch(m);
      if (r.total > 0 && !reserve(s, L, L.n + r.total)) {
        // Pool full: drop what fell below the (raised) bound, filter this batch again.
        bound = raise_bound(s, k, bound);
        since_raise = 0;
        compact(s, L, bound);
        m = batch_candidates(cur, cur_valid, bound);
        r = rank_batch(m);
        if (!reserve(s, L, L.n + r.total)) abandon(s, L);
      }
      if (!L.global && r.total > 0) {
        store_batch(s, L, sl, s0, cur, m, r);
        __syncwarp();
        // Keys and counts lane-parallel over the new entries.
        for (uint32_t e = L.n + lane; e < L.n + r.total; e += kWarpSize) {
          const uint32_t at = phys(s, e);
          const unsigned long long raw = s.pool[at];
          const uint32_t key = topk_order_key(__uint_as_float(uint32_t(raw >> 32)));
          s.pool[at] = (static_cast<unsigned long long>(key) << 32) | uint32_t(raw);
          if (b > 0) count_digit0(s, key);  // the first batch was counted whole
        }
        __syncwarp();
        L.n += r.total;
        since_raise += r.total;
      }
    }
    if (L.global && b > 0 && __any_sync(kFullMask, m != 0)) {
      // Abandoned list: the items are still counted (the refinement re-reads the slice).
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float x[4] = {cur[u].x, cur[u].y, cur[u].z, cur[u].w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if ((m >> (4 * u + c)) & 1u) count_digit0(s, topk_order_key(x[c]));
        }
      }
      since_raise = kRaiseEvery;
    }
    if (since_raise >= kRaiseEvery) {
      bound = raise_bound(s, k, bound);
      since_raise = 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) cur[u] = nxt[u];
  }
}

// Whole CTA, after stream_slice: the digit-0 search over the cluster (see find_in_cluster). When
// no warp had a second batch (s.one_batch), the stream counted every item before its starting
// search (k_sample = k), which is then this search over final counts: repeating it after the
// stream costs a cluster barrier and ~2 us of DSMEM reads (one 128K row, H200).
// NOTES (H200, 2026-12-04): only the one-CTA-per-SM build (kReuse) takes that shortcut: in the
// 128-register build, any form of the second path tried (a register flag, this shared one, a
// second exit from the caller's loop) spilled into the stream loop, 7-8 % slower at 4096 x 128K.
// A second copy of the stream specialised for one batch cost the one-row path more in
// instruction fetch than it saved.
template <bool kReuse>
__device__ bool digit0_search(Smem& s, const ClusterView& cv, uint32_t k, Found& f) {
  if (kReuse && s.one_batch) return published_found(s, f);
  __syncthreads();
  sum_groups(s, 0, 11);
  cv.sync();
  return find_in_cluster(s, cv, 0, 11, k, true, f);
}

// ---- refinement and emission -----------------------------------------------------------------

// One refinement level for a warp: keeps the candidates with (key >> shift) >= prefix and calls
// on_eq(key) for those with (key >> shift) == prefix. A list is compacted in place; an abandoned
// one re-reads its slice and tries to collect those candidates into pages again.
template <class OnEq>
__device__ void refine_list(Smem& s, WarpList& L, const Slice& sl, uint32_t shift, uint32_t prefix,
                            OnEq&& on_eq) {
  if (!L.global) {
    narrow_list(s, L, shift, prefix, on_eq);
    return;
  }
  bool collecting = true;
  L.n = 0;
  for_each_slice_step(sl, [&](const uint32_t (&key)[4], const uint32_t (&col)[4], uint32_t valid) {
    uint32_t m = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t d = key[c] >> shift;
      if ((valid >> c) & 1u) {
        m |= uint32_t(d >= prefix) << c;
        if (d == prefix) on_eq(key[c]);
      }
    }
    if (collecting && !append(s, L, key, col, m)) collecting = false;
  });
  if (collecting) {
    L.global = false;
  } else {
    abandon(s, L);
  }
}

// The selection predicate: `all` takes every existing item; otherwise items with
// (key >> shift) > prefix are above the threshold and those == prefix at it.
struct Threshold {
  bool all;
  uint32_t shift, prefix;

  __device__ void classify(const uint32_t (&key)[4], uint32_t valid, uint32_t& gt,
                           uint32_t& eq) const {
    gt = eq = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t d = key[c] >> shift;
      gt |= uint32_t(all || d > prefix) << c;
      eq |= uint32_t(!all && d == prefix) << c;
    }
    gt &= valid;
    eq &= valid;
  }
};

// Whole CTA: bitonic sort, descending, of the kMaxTopk entries of a; the result is left in
// registers, thread t holding entries [kSortPer * t, kSortPer * t + kSortPer). Compare-exchanges
// between a thread's own entries run in registers, between lanes of a warp through shuffles, and
// only those between warps (6 of the 66 steps) through shared memory.
constexpr int kSortPer = kMaxTopk / kThreads;
static_assert(kSortPer == 8, "the stride cases below assume 8 entries per thread");

__device__ __forceinline__ void bitonic_sort_desc(unsigned long long* a,
                                                  unsigned long long (&v)[kSortPer]) {
  const int t = threadIdx.x;
#pragma unroll
  for (int j = 0; j < kSortPer; ++j) v[j] = a[kSortPer * t + j];
#pragma unroll
  for (int size = 2; size <= kMaxTopk; size *= 2) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      if (stride < kSortPer) {
#pragma unroll
        for (int j = 0; j < kSortPer; ++j) {
          if ((j & stride) == 0) {
            const int jj = j | stride;
            const bool descending = ((kSortPer * t + j) & size) == 0;
            const unsigned long long x = v[j], y = v[jj];
            if ((x < y) == descending) {
              v[j] = y;
              v[jj] = x;
            }
          }
        }
        continue;
      }
      // Partner thread t ^ d holds the partner entries; the lower index keeps the larger entry
      // in a descending block, the smaller in an ascending one.
      const int d = stride / kSortPer;
      const bool keep_max = ((t & d) == 0) == (((kSortPer * t) & size) == 0);
      if (d < kWarpSize) {
#pragma unroll
        for (int j = 0; j < kSortPer; ++j) {
          const unsigned long long o = __shfl_xor_sync(kFullMask, v[j], d);
          v[j] = keep_max ? max(v[j], o) : min(v[j], o);
        }
      } else {
        __syncthreads();  // the previous exchange's reads are done
#pragma unroll
        for (int j = 0; j < kSortPer; ++j) a[kSortPer * t + j] = v[j];
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kSortPer; ++j) {
          const unsigned long long o = a[kSortPer * (t ^ d) + j];
          v[j] = keep_max ? max(v[j], o) : min(v[j], o);
        }
      }
    }
  }
}

}  // namespace topk_radix
}  // namespace indexcache
