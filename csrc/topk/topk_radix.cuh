// Device pieces of the radix top-k: one thread block selects the k best items of one stream of
// (order key, column) items. The stream is a logits window (LogitsSource), the candidate segments
// an earlier split stage left in the workspace (CandSource) or the block's shared-memory list
// (ListSource). Torch-free; included by topk.cu only.
//
// NOTES:
// - Exact threshold, never a bounded guess. Digit 0 is the top 11 bits of topk_order_key; the
//   bin holding the k-th largest key is found from a full histogram, then digits 1 (11 bits) and
//   2 (10 bits) refine the prefix over the items that share it. After the last digit the k-th key
//   T is exact; the output is every key > T plus the first (k - #greater) keys == T in index
//   order. Refinement stops early when the whole prefix bin is taken (#in bin == still needed).
// - One read of the row in the common case. While the digit-0 histogram is built tile by tile,
//   items whose digit is >= the running k-th bin (a lower bound of the final bin: it only rises
//   as more of the row is seen) are appended, in index order, to a list in shared memory
//   (kListCap items). Refinement and the final selection then run on that list. If the list
//   would overflow even after compacting it to the current running bin (many near-equal keys in
//   one coarse bin, the peers' silent-overflow case), it is abandoned, and the refinement reads
//   the row again (a histogram pass per digit) until the exact count of items at or above the
//   refined prefix fits the list (then one more read collects them), or the key is fully
//   resolved. Every decision is taken on exact counts, so no path can drop an item.
// - Columns are int32 (the op checks C < 2^31); the per-item arithmetic assumes C < 2^31 - 2^13.
// - Measured on H100 (issue 5): one block takes ~2.5 us per 4096-item tile (1 x 1M row in one
//   block: 659 us), and 4096 x 128K reaches ~1.08 TB/s, so the kernel is bound by the per-tile
//   latency chain (two barriers, the rank scans, the running-bin walk, a register prefetch that
//   may not overlap at 128 registers), not by HBM. Next step: a barrier-free pass 1 (each warp
//   streams its own sub-range into its own sub-list; a racy read of the histogram still gives a
//   valid lower bound, as counts only grow) fed by cp.async/TMA stages in shared memory.
// - Determinism: all counts are integers (order-free atomics), and every write position comes
//   from a block-wide prefix count in index order (rank_tile), never from an atomic. Output is
//   therefore in ascending column order (unsorted) or by (value desc, column asc) (sorted),
//   bit-identical run to run, and -1 padded when the window holds fewer than k items.
// - Item order inside a tile: thread t holds slots tile * kTileSlots + j * kThreads + t
//   (j = 0..3), 4 consecutive items per slot, so a warp's float4 loads are coalesced and the
//   index order is (j, thread, item): rank_tile counts in exactly that order.
// - Loads never leave the window: a 4-item slot is read as one float4 only when it lies wholly
//   inside [begin, end); the partial slots at both ends are read item by item.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/numeric.h"
#include "indexcache/params.h"
#include "indexcache/warp.h"

namespace indexcache {
namespace topk_radix {

constexpr int kThreads = 256;  // two blocks per SM: <= 128 registers, 2 x ~89 KB shared memory
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kSlotItems = 4;
constexpr int kSlotsPerThread = 4;
constexpr int kItemsPerThread = kSlotItems * kSlotsPerThread;  // 16
constexpr int kTileSlots = kThreads * kSlotsPerThread;          // 1024
constexpr int kTileItems = kTileSlots * kSlotItems;             // 4096
constexpr int kListCap = 8192;                                  // list items (key + column)
constexpr int kSegCap = kMaxTopk;   // items per candidate segment of the split path
constexpr int kSegSlots = kSegCap / kSlotItems;
constexpr int kBins = 2048;         // digits 0 and 1: 11 bits; digit 2: 10 bits
constexpr uint32_t kShift0 = 21;

static_assert(kWarps <= kWarpSize, "warp totals are scanned by one warp");
static_assert(kBins % kThreads == 0, "find_bin gives every thread the same number of bins");
static_assert(kSlotsPerThread <= 4, "rank_tile packs one 8-bit count per slot in a word");
static_assert(kListCap % kSlotItems == 0 && kSegCap % kSlotItems == 0, "whole slots");

struct Smem {
  uint32_t list_key[kListCap];
  uint32_t list_idx[kListCap];
  unsigned long long sort[kMaxTopk];  // (key << 32 | ~column) of the selection when sorted
  uint32_t hist[kBins];
  uint32_t tot[2][kWarps];  // rank_tile's per-warp totals, double-buffered
  uint32_t scan[kWarps];
  uint32_t run_bin;         // pass 1: bin of the k-th largest key seen so far
  uint32_t run_cnt;         // pass 1: number of keys seen so far whose digit 0 >= run_bin
  uint32_t found[3];        // find_bin's answer
};

// A thread's 16 items of one tile; bit i of `valid` (i = j * 4 + item) says whether item i exists.
struct Tile {
  uint32_t key[kItemsPerThread];
  uint32_t idx[kItemsPerThread];
  uint32_t valid;
};

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }

__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t x) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const uint32_t y = __shfl_up_sync(0xFFFFFFFFu, x, offset);
    if (lane_id() >= offset) x += y;
  }
  return x;
}

// Exclusive prefix sum of x over the block in thread order; total gets the block's sum.
// Two barriers; `scratch` is free again after the caller's next barrier.
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t x, uint32_t* scratch,
                                                        uint32_t& total) {
  const uint32_t incl = warp_inclusive_sum(x);
  if (lane_id() == kWarpSize - 1) scratch[warp_id()] = incl;
  __syncthreads();
  const uint32_t w = warp_inclusive_sum(lane_id() < kWarps ? scratch[lane_id()] : 0u);
  total = __shfl_sync(0xFFFFFFFFu, w, kWarpSize - 1);
  const uint32_t before = __shfl_sync(0xFFFFFFFFu, w, (warp_id() + kWarpSize - 1) % kWarpSize);
  return (warp_id() == 0 ? 0u : before) + incl - x;
}

// Ranks of a tile's flagged items in tile order. base[j] is the number of flagged items of the
// tile before this thread's slot j; an item's rank adds the flagged items before it in the slot.
struct TileRank {
  uint32_t base[kSlotsPerThread];
  uint32_t total;
};

// One barrier. `tot` alternates between the two Smem::tot buffers on consecutive calls: the
// buffer read after this call's barrier is written again only two calls later, i.e. after every
// thread has passed the barrier of the call in between.
__device__ __forceinline__ TileRank rank_tile(uint32_t mask, uint32_t* tot) {
  // Per-slot counts (<= 4) packed in 8-bit fields: a warp's sum per field is <= 128.
  uint32_t packed = 0;
#pragma unroll
  for (int j = 0; j < kSlotsPerThread; ++j) packed |= uint32_t(__popc((mask >> (4 * j)) & 0xFu)) << (8 * j);
  const uint32_t incl = warp_inclusive_sum(packed);
  const uint32_t excl = incl - packed;
  if (lane_id() == kWarpSize - 1) tot[warp_id()] = incl;
  __syncthreads();
  // Block level: fields widened to 16 bits (block sum per field <= 4 * kThreads), two per word.
  const uint32_t w = lane_id() < kWarps ? tot[lane_id()] : 0u;
  const int prev = (warp_id() + kWarpSize - 1) % kWarpSize;
  TileRank r;
  uint32_t running = 0;
#pragma unroll
  for (int pair = 0; pair < (kSlotsPerThread + 1) / 2; ++pair) {
    const uint32_t fields = (w >> (16 * pair)) & 0xFFFFu;
    const uint32_t incl_pair = warp_inclusive_sum((fields & 0xFFu) | (fields >> 8) << 16);
    const uint32_t all = __shfl_sync(0xFFFFFFFFu, incl_pair, kWarpSize - 1);
    const uint32_t before = warp_id() == 0 ? 0u : __shfl_sync(0xFFFFFFFFu, incl_pair, prev);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = 2 * pair + half;
      if (j < kSlotsPerThread) {
        r.base[j] = running + ((before >> (16 * half)) & 0xFFFFu) + ((excl >> (8 * j)) & 0xFFu);
        running += (all >> (16 * half)) & 0xFFFFu;
      }
    }
  }
  r.total = running;
  return r;
}

// Rank of item i among the flagged items of the tile (valid for flagged and unflagged i alike:
// the number of flagged items before it).
__device__ __forceinline__ uint32_t item_rank(const TileRank& r, uint32_t mask, int i) {
  const int j = i / kSlotItems, c = i % kSlotItems;
  return r.base[j] + __popc((mask >> (4 * j)) & ((1u << c) - 1u));
}

// ---- item sources ---------------------------------------------------------------------------

// Columns [begin, end) of one logits row; `row` points at column 0. Columns fit in int32 (the
// op checks C < 2^31), so the per-item arithmetic is 32-bit.
struct LogitsSource {
  static constexpr bool kPrefetch = true;
  struct Raw {
    float4 v[kSlotsPerThread];
  };
  const float* row;
  int begin, end;
  int first;  // column of slot 0: begin rounded down to a 16-byte boundary (may be < 0)
  int slots;

  __device__ LogitsSource(const float* row_, int begin_, int end_)
      : row(row_), begin(begin_), end(end_) {
    first = begin - int((reinterpret_cast<uintptr_t>(row + begin) / sizeof(float)) % 4);
    slots = end > begin ? (end - first + kSlotItems - 1) / kSlotItems : 0;
  }
  __device__ int num_slots() const { return slots; }

  __device__ void load(int tile, Raw& raw) const {
#pragma unroll
    for (int j = 0; j < kSlotsPerThread; ++j) {
      const int slot = tile * kTileSlots + j * kThreads + threadIdx.x;
      const int col = first + slot * kSlotItems;
      if (slot >= slots) continue;
      if (col >= begin && col + kSlotItems <= end) {
        raw.v[j] = __ldg(reinterpret_cast<const float4*>(row + col));
      } else {
        float x[kSlotItems];
#pragma unroll
        for (int c = 0; c < kSlotItems; ++c) {
          x[c] = (col + c >= begin && col + c < end) ? __ldg(row + col + c) : 0.0f;
        }
        raw.v[j] = make_float4(x[0], x[1], x[2], x[3]);
      }
    }
  }

  __device__ void decode(int tile, const Raw& raw, Tile& t) const {
    t.valid = 0;
#pragma unroll
    for (int j = 0; j < kSlotsPerThread; ++j) {
      const int slot = tile * kTileSlots + j * kThreads + threadIdx.x;
      const int col = first + slot * kSlotItems;
      const float x[kSlotItems] = {raw.v[j].x, raw.v[j].y, raw.v[j].z, raw.v[j].w};
#pragma unroll
      for (int c = 0; c < kSlotItems; ++c) {
        const int i = j * kSlotItems + c;
        t.key[i] = topk_order_key(x[c]);
        t.valid |= uint32_t(col + c >= begin && col + c < end) << i;
      }
    }
  }
  // Columns are recomputed rather than carried in the tile (registers).
  __device__ uint32_t column(int tile, const Tile&, int i) const {
    const int slot = tile * kTileSlots + (i / kSlotItems) * kThreads + threadIdx.x;
    return uint32_t(first + slot * kSlotItems + i % kSlotItems);
  }
};

// Candidate segments of one row left by a split stage: segment s holds counts[s] (<= kSegCap)
// items in index order, and the segments follow each other in index order.
struct CandSource {
  static constexpr bool kPrefetch = false;
  using Raw = Tile;
  const uint32_t* keys;  // [segments, kSegCap]
  const uint32_t* idx;   // [segments, kSegCap]
  const int32_t* counts; // [segments]
  int segments;

  __device__ int num_slots() const { return segments * kSegSlots; }

  __device__ void load(int tile, Tile& t) const {
    t.valid = 0;
#pragma unroll
    for (int j = 0; j < kSlotsPerThread; ++j) {
      const int slot = tile * kTileSlots + j * kThreads + threadIdx.x;
      if (slot >= num_slots()) continue;
      const int in_seg = int(slot % kSegSlots) * kSlotItems;
      const int count = counts[slot / kSegSlots];
      if (in_seg >= count) continue;
      if (in_seg + kSlotItems <= count) {
        const uint4 k4 = __ldg(reinterpret_cast<const uint4*>(keys) + slot);
        const uint4 i4 = __ldg(reinterpret_cast<const uint4*>(idx) + slot);
        t.key[4 * j] = k4.x, t.key[4 * j + 1] = k4.y, t.key[4 * j + 2] = k4.z, t.key[4 * j + 3] = k4.w;
        t.idx[4 * j] = i4.x, t.idx[4 * j + 1] = i4.y, t.idx[4 * j + 2] = i4.z, t.idx[4 * j + 3] = i4.w;
        t.valid |= 0xFu << (4 * j);
      } else {
#pragma unroll
        for (int c = 0; c < kSlotItems; ++c) {
          if (in_seg + c < count) {
            t.key[4 * j + c] = __ldg(keys + slot * kSlotItems + c);
            t.idx[4 * j + c] = __ldg(idx + slot * kSlotItems + c);
            t.valid |= 1u << (4 * j + c);
          }
        }
      }
    }
  }
  __device__ void decode(int, const Tile& raw, Tile& t) const { t = raw; }
  __device__ uint32_t column(int, const Tile& t, int i) const { return t.idx[i]; }

  __device__ int64_t count_valid() const {
    int64_t n = 0;
    for (int s = 0; s < segments; ++s) n += counts[s];
    return n;
  }
};

// The first `count` entries of the shared-memory list.
struct ListSource {
  static constexpr bool kPrefetch = false;
  using Raw = Tile;
  const Smem* s;
  uint32_t count;

  __device__ int num_slots() const { return int(count + kSlotItems - 1) / kSlotItems; }

  __device__ void load(int tile, Tile& t) const {
    t.valid = 0;
#pragma unroll
    for (int j = 0; j < kSlotsPerThread; ++j) {
      const int slot = tile * kTileSlots + j * kThreads + threadIdx.x;
      if (slot >= num_slots()) continue;
      const uint4 k4 = reinterpret_cast<const uint4*>(s->list_key)[slot];
      const uint4 i4 = reinterpret_cast<const uint4*>(s->list_idx)[slot];
      t.key[4 * j] = k4.x, t.key[4 * j + 1] = k4.y, t.key[4 * j + 2] = k4.z, t.key[4 * j + 3] = k4.w;
      t.idx[4 * j] = i4.x, t.idx[4 * j + 1] = i4.y, t.idx[4 * j + 2] = i4.z, t.idx[4 * j + 3] = i4.w;
#pragma unroll
      for (int c = 0; c < kSlotItems; ++c) {
        t.valid |= uint32_t(slot * kSlotItems + c < count) << (4 * j + c);
      }
    }
  }
  __device__ void decode(int, const Tile& raw, Tile& t) const { t = raw; }
  __device__ uint32_t column(int, const Tile& t, int i) const { return t.idx[i]; }
};

// Calls f(tile number, tile) for every tile of the source in order, prefetching the next tile
// into registers where the source is global memory; stops early when f returns false. Every
// thread of the block runs the same iterations (f may hold barriers).
template <class Src, class F>
__device__ __forceinline__ void for_each_tile(const Src& src, F&& f) {
  const int tiles = (src.num_slots() + kTileSlots - 1) / kTileSlots;
  if constexpr (Src::kPrefetch) {
    typename Src::Raw cur, next;
    if (tiles > 0) src.load(0, cur);
    for (int t = 0; t < tiles; ++t) {
      if (t + 1 < tiles) src.load(t + 1, next);
      Tile tile;
      src.decode(t, cur, tile);
      if (!f(t, tile)) break;
      cur = next;
    }
  } else {
    for (int t = 0; t < tiles; ++t) {
      Tile tile;
      src.load(t, tile);
      if (!f(t, tile)) break;
    }
  }
}

// ---- selection steps ------------------------------------------------------------------------

template <class Src>
__device__ __forceinline__ void write_to_list(Smem& s, const Src& src, int tile, const Tile& t,
                                              uint32_t mask, const TileRank& r, uint32_t offset) {
#pragma unroll
  for (int i = 0; i < kItemsPerThread; ++i) {
    if ((mask >> i) & 1u) {
      const uint32_t pos = offset + item_rank(r, mask, i);
      s.list_key[pos] = t.key[i];
      s.list_idx[pos] = src.column(tile, t, i);
    }
  }
}

// Items with (key >> shift) >= prefix as a mask over the tile.
__device__ __forceinline__ uint32_t at_or_above(const Tile& t, uint32_t shift, uint32_t prefix) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kItemsPerThread; ++i) m |= uint32_t((t.key[i] >> shift) >= prefix) << i;
  return m & t.valid;
}

struct Found {
  uint32_t bin;      // the bin holding the k_rem-th largest counted item
  uint32_t greater;  // counted items in higher bins (< k_rem)
  uint32_t count;    // items in `bin` (greater + count >= k_rem)
};

// Searches s.hist[0, bins) from the top. The caller guarantees sum(hist) >= k_rem >= 1.
__device__ __forceinline__ Found find_bin(Smem& s, int bins, uint32_t k_rem) {
  const int per = bins / kThreads;
  const int top = bins - 1 - int(threadIdx.x) * per;  // this thread: bins top, top - 1, ...
  uint32_t sum = 0;
  for (int j = 0; j < per; ++j) sum += s.hist[top - j];
  uint32_t total;
  uint32_t above = block_exclusive_sum(sum, s.scan, total);
  for (int j = 0; j < per; ++j) {
    const uint32_t h = s.hist[top - j];
    if (above < k_rem && above + h >= k_rem) {
      s.found[0] = uint32_t(top - j);
      s.found[1] = above;
      s.found[2] = h;
    }
    above += h;
  }
  __syncthreads();
  const Found f{s.found[0], s.found[1], s.found[2]};
  __syncthreads();
  return f;
}

// Warp 0 only: raises s.run_bin to the bin of the k-th largest digit-0 key counted so far.
// Invariant: s.run_cnt = sum(hist[run_bin:]); `added` is the number of this tile's items counted
// at or above the old run_bin.
__device__ __forceinline__ void advance_running_bin(Smem& s, uint32_t added, uint32_t k) {
  uint32_t bin = s.run_bin, at_or_above = s.run_cnt + added;
  while (true) {
    const uint32_t b = bin + lane_id();
    const uint32_t incl = warp_inclusive_sum(b < kBins ? s.hist[b] : 0u);
    // Bins bin..b can be passed when the items above them still number >= k.
    const bool pass = b < kBins - 1 && at_or_above >= incl + k;
    const int passed = __popc(__ballot_sync(0xFFFFFFFFu, pass));  // a prefix of the lanes
    if (passed > 0) {
      at_or_above -= __shfl_sync(0xFFFFFFFFu, incl, passed - 1);
      bin += passed;
    }
    if (passed < kWarpSize) break;
  }
  if (lane_id() == 0) {
    s.run_bin = bin;
    s.run_cnt = at_or_above;
  }
}

// In-place compaction of the list to the items whose digit 0 is >= bin, order kept. Safe in
// place: an item moves only down, and a tile's items are all read before its rank barrier.
__device__ __forceinline__ uint32_t compact_list(Smem& s, uint32_t count, uint32_t bin, int& par) {
  uint32_t kept = 0;
  const ListSource list{&s, count};
  for_each_tile(list, [&](int tile, const Tile& t) {
    const uint32_t m = at_or_above(t, kShift0, bin);
    const TileRank r = rank_tile(m, s.tot[par]);
    par ^= 1;
    write_to_list(s, list, tile, t, m, r, kept);
    kept += r.total;
    return true;
  });
  __syncthreads();
  return kept;
}

// Pass 1: the digit-0 histogram of every item, and the list of items at or above the running
// bin. Returns whether the list is complete (holds every item whose digit 0 >= the final bin).
template <class Src>
__device__ bool histogram_and_collect(Smem& s, const Src& src, uint32_t k, uint32_t& list_count,
                                      int& par) {
  for (int i = threadIdx.x; i < kBins; i += kThreads) s.hist[i] = 0;
  if (threadIdx.x == 0) s.run_bin = s.run_cnt = 0;
  __syncthreads();
  bool collecting = true;
  uint32_t run_bin = 0;
  list_count = 0;
  for_each_tile(src, [&](int tile, const Tile& t) {
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      if ((t.valid >> i) & 1u) atomicAdd(&s.hist[t.key[i] >> kShift0], 1u);
    }
    if (!collecting) return true;
    uint32_t m = at_or_above(t, kShift0, run_bin);
    TileRank r = rank_tile(m, s.tot[par]);  // its barrier also completes the histogram
    par ^= 1;
    if (warp_id() == 0) advance_running_bin(s, r.total, k);
    const bool fits = list_count + r.total <= kListCap;
    if (fits) write_to_list(s, src, tile, t, m, r, list_count);
    __syncthreads();
    run_bin = s.run_bin;
    if (fits) {
      list_count += r.total;
      return true;
    }
    // Full: drop what fell below the (risen) running bin, re-rank this tile against it.
    list_count = compact_list(s, list_count, run_bin, par);
    m = at_or_above(t, kShift0, run_bin);
    r = rank_tile(m, s.tot[par]);
    par ^= 1;
    if (list_count + r.total <= kListCap) {
      write_to_list(s, src, tile, t, m, r, list_count);
      list_count += r.total;
    } else {
      collecting = false;  // near-equal keys crowd one coarse bin: refine from the source
    }
    return true;
  });
  __syncthreads();
  return collecting;
}

// Histogram of the digit at `shift` (bins wide) over the items whose key >> (shift + log2 bins)
// equals `prefix`.
template <class Src>
__device__ void histogram_digit(Smem& s, const Src& src, uint32_t high_shift, uint32_t prefix,
                                uint32_t shift, int bins) {
  for (int i = threadIdx.x; i < bins; i += kThreads) s.hist[i] = 0;
  __syncthreads();
  for_each_tile(src, [&](int tile, const Tile& t) {
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      if (((t.valid >> i) & 1u) && (t.key[i] >> high_shift) == prefix) {
        atomicAdd(&s.hist[(t.key[i] >> shift) & uint32_t(bins - 1)], 1u);
      }
    }
    return true;
  });
  __syncthreads();
}

// Copies the items with (key >> shift) >= prefix from the source into the list, in order.
template <class Src>
__device__ uint32_t collect_at_or_above(Smem& s, const Src& src, uint32_t shift, uint32_t prefix,
                                        int& par) {
  uint32_t n = 0;
  for_each_tile(src, [&](int tile, const Tile& t) {
    const uint32_t m = at_or_above(t, shift, prefix);
    const TileRank r = rank_tile(m, s.tot[par]);
    par ^= 1;
    write_to_list(s, src, tile, t, m, r, n);
    n += r.total;
    return true;
  });
  __syncthreads();
  return n;
}

// Final pass: emits the items with (key >> shift) > prefix (`greater` of them) and the first
// k_rem items with (key >> shift) == prefix, each at its rank in index order among the emitted
// ones. With all = true every valid item is emitted (greater = their number, k_rem = 0).
template <class Src, class Out>
__device__ void emit_selection(Smem& s, const Src& src, bool all, uint32_t shift, uint32_t prefix,
                               uint32_t greater, uint32_t k_rem, Out& out, int& par) {
  uint32_t gt_run = 0, eq_run = 0;
  for_each_tile(src, [&](int tile, const Tile& t) {
    uint32_t gt = 0, eq = 0;
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const uint32_t d = t.key[i] >> shift;
      gt |= uint32_t(all || d > prefix) << i;
      eq |= uint32_t(!all && d == prefix) << i;
    }
    gt &= t.valid;
    eq &= t.valid;
    const TileRank rg = rank_tile(gt, s.tot[par]);
    par ^= 1;
    const TileRank re = rank_tile(eq, s.tot[par]);
    par ^= 1;
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const uint32_t eq_before = eq_run + item_rank(re, eq, i);
      const uint32_t taken_before = gt_run + item_rank(rg, gt, i) + min(eq_before, k_rem);
      if (((gt >> i) & 1u) || (((eq >> i) & 1u) && eq_before < k_rem)) {
        out.emit(s, taken_before, t.key[i], src.column(tile, t, i));
      }
    }
    gt_run += rg.total;
    eq_run += re.total;
    return gt_run < greater || eq_run < k_rem;  // uniform: stop once all are emitted
  });
}

// Descending bitonic sort of a[0, n), n a power of two.
__device__ __forceinline__ void bitonic_sort_desc(unsigned long long* a, int n) {
  for (int size = 2; size <= n; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < n / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const unsigned long long x = a[lo], y = a[hi];
        if ((x < y) == descending) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Output of a final stage: columns into one row of the op's output.
struct RowOut {
  int32_t* out;
  int k;
  bool sorted;

  __device__ void emit(Smem& s, uint32_t pos, uint32_t key, uint32_t idx) {
    if (sorted) {
      s.sort[pos] = (static_cast<unsigned long long>(key) << 32) | (~idx);
    } else {
      out[pos] = int32_t(idx);
    }
  }
  // `count` items were emitted at [0, count).
  __device__ void finish(Smem& s, uint32_t count) {
    if (!sorted) {
      for (int i = count + threadIdx.x; i < k; i += kThreads) out[i] = -1;
      return;
    }
    // Padding sorts last: a real entry's low word ~column is >= 2^31 > 0.
    int n = 1;
    while (n < int(count)) n *= 2;
    for (int i = count + threadIdx.x; i < n; i += kThreads) s.sort[i] = 0;
    __syncthreads();
    bitonic_sort_desc(s.sort, n);
    for (int i = threadIdx.x; i < k; i += kThreads) {
      out[i] = i < int(count) ? int32_t(~uint32_t(s.sort[i])) : -1;
    }
  }
};

// Output of a split stage: one candidate segment (keys, columns, count) in index order.
struct SegOut {
  uint32_t* keys;
  uint32_t* idx;
  int32_t* count;

  __device__ void emit(Smem&, uint32_t pos, uint32_t key, uint32_t i) {
    keys[pos] = key;
    idx[pos] = i;
  }
  __device__ void finish(Smem&, uint32_t n) {
    if (threadIdx.x == 0) *count = int32_t(n);
  }
};

// The k best of the n_valid items of `src` (k <= kMaxTopk) into `out`.
template <class Src, class Out>
__device__ void select_topk(Smem& s, const Src& src, int64_t n_valid, uint32_t k, Out& out) {
  int par = 0;
  if (n_valid <= int64_t(k)) {
    emit_selection(s, src, true, 0, 0, uint32_t(n_valid), 0, out, par);
    __syncthreads();
    out.finish(s, uint32_t(n_valid));
    return;
  }
  uint32_t list_count;
  bool on_list = histogram_and_collect(s, src, k, list_count, par);
  const Found f0 = find_bin(s, kBins, k);
  uint32_t shift = kShift0, prefix = f0.bin, greater = f0.greater, k_rem = k - f0.greater;
  uint32_t in_bin = f0.count;
  // Refine while the prefix bin holds more items than are still needed.
  while (shift > 0 && in_bin != k_rem) {
    if (!on_list && greater + in_bin <= kListCap) {
      list_count = collect_at_or_above(s, src, shift, prefix, par);
      on_list = true;
    }
    const uint32_t next_shift = shift > 10 ? 10 : 0;
    const uint32_t bits = shift - next_shift;
    if (on_list) {
      histogram_digit(s, ListSource{&s, list_count}, shift, prefix, next_shift, 1 << bits);
    } else {
      histogram_digit(s, src, shift, prefix, next_shift, 1 << bits);
    }
    const Found f = find_bin(s, 1 << bits, k_rem);
    prefix = (prefix << bits) | f.bin;
    shift = next_shift;
    greater += f.greater;
    k_rem -= f.greater;
    in_bin = f.count;
  }
  if (on_list) {
    emit_selection(s, ListSource{&s, list_count}, false, shift, prefix, greater, k_rem, out, par);
  } else {
    emit_selection(s, src, false, shift, prefix, greater, k_rem, out, par);
  }
  __syncthreads();
  out.finish(s, k);
}

}  // namespace topk_radix
}  // namespace indexcache
