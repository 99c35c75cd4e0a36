// Top-k over row windows of a materialised fp32 logits matrix (k <= 2048): exact radix selection
// over topk_order_key, deterministic under ties. The selection itself is topk_radix.cuh's.
//
// NOTES:
// - Two regimes, chosen here from R, C and the SM count (plan()):
//   * Many rows (R >= #SMs, or rows short enough for one block): one block per row, one launch,
//     no workspace. The row is read once in the common case (pass 1 builds the digit-0
//     histogram and the candidate list together); see topk_radix.cuh.
//   * Few long rows (decode): each row is cut into G chunks, one block per chunk selects the
//     chunk's own top k (same tie rule) into a candidate segment of the workspace; merge launches
//     then select the top k of up to kMergeFan segments per block, until at most kFinalSegs
//     segments per row remain and one block per row selects from them into the output. The
//     row's top k is the top k of its chunks' top ks, and segments keep index order, so the
//     result is the same set, the same tie resolution and the same output order as one block
//     per row. No block ever waits for another (no co-residency assumption, no spin); launches
//     are ordered by the stream, nothing synchronises the host, and every launch is capturable.
// - Workspace (split regime only; the op layer allocates it with the caching allocator):
//     R * (G + (G > kFinalSegs ? ceil(G / kMergeFan) : 0)) segments, each kSegCap keys (u32) +
//     kSegCap columns (u32) + one count (i32), each array 256-byte aligned:
//     topk_workspace_bytes(). It depends on R and G only (kSegCap = kMaxTopk, whatever k is).
// - INDEXCACHE_TOPK_SPLIT=<G> forces the chunk count (1 = one block per row): a testing and
//   tuning override; unset, plan() decides.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "topk/topk_radix.cuh"

namespace indexcache {
namespace {

using namespace topk_radix;

constexpr int kMergeFan = 8;        // segments one merge block reads
constexpr int kFinalSegs = 16;      // at most this many segments go to the final block
// Split plan, from an H100 sweep of G (INDEXCACHE_TOPK_SPLIT) at k = 2048: one block per row up
// to 32K columns; chunks of >= 16K columns (1 x 128K: G = 8; 1 x 1M: G = 64); and never more
// blocks than two per SM in one wave (64 x 128K: G = 4, where G = 5 took a second wave).
constexpr int64_t kChunkMin = 16384; // columns per chunk, at least, in the split regime
constexpr int64_t kSplitMinCols = 32768;
constexpr int kMaxSplit = 1024;
constexpr size_t kSmemBytes = sizeof(Smem);

// Candidate segments of one split stage: segment (r, g) lives at r * segs_per_row + g.
struct SegBuf {
  uint32_t* keys;
  uint32_t* idx;
  int32_t* counts;
  int64_t segs_per_row;

  __device__ SegOut at(int64_t r, int64_t g) const {
    const int64_t seg = r * segs_per_row + g;
    return SegOut{keys + seg * kSegCap, idx + seg * kSegCap, counts + seg};
  }
};

__device__ __forceinline__ Smem& shared_state() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return *reinterpret_cast<Smem*>(smem_raw);
}

// Block (r, g): chunk g of G of row r's window (G = 1: the whole window, straight to the output).
// One block per job, no grid-stride loop: the loop's live state costs the selection registers.
template <bool kSplit>
__global__ void __launch_bounds__(kThreads, 2)
    topk_logits_kernel(const TopkParams p, int G, SegBuf seg_out) {
  Smem& s = shared_state();
  const int64_t r = blockIdx.x / G, g = blockIdx.x % G;
  // Device windows are not validated (that would need a host sync): clamp as the CPU does.
  int64_t begin = p.row_starts ? p.row_starts[r] : 0;
  int64_t end = p.row_ends ? p.row_ends[r] : p.C;
  begin = std::min(std::max<int64_t>(begin, 0), p.C);
  end = std::min(std::max(end, begin), p.C);
  if (kSplit) {
    const int64_t chunk = ((end - begin + G - 1) / G + 3) / 4 * 4;
    const int64_t chunk_begin = std::min(begin + g * chunk, end);
    end = std::min(chunk_begin + chunk, end);
    begin = chunk_begin;
  }
  const LogitsSource src(p.logits + r * p.logits_row_stride, int(begin), int(end));
  if constexpr (kSplit) {
    SegOut out = seg_out.at(r, g);
    select_topk(s, src, end - begin, uint32_t(p.k), out);
  } else {
    RowOut out{p.out + r * p.out_row_stride, p.k, p.sorted};
    select_topk(s, src, end - begin, uint32_t(p.k), out);
  }
}

// Block (r, g): segments [g * fan, (g + 1) * fan) of row r's `in` segments (nseg of them).
template <bool kFinal>
__global__ void __launch_bounds__(kThreads, 2)
    topk_merge_kernel(const TopkParams p, SegBuf in, int nseg, int fan, SegBuf seg_out) {
  Smem& s = shared_state();
  const int groups = (nseg + fan - 1) / fan;
  const int64_t r = blockIdx.x / groups, g = blockIdx.x % groups;
  const int first = int(g) * fan, last = std::min(first + fan, nseg);
  const int64_t seg = r * in.segs_per_row + first;
  const CandSource src{in.keys + seg * kSegCap, in.idx + seg * kSegCap, in.counts + seg,
                       last - first};
  const int64_t n_valid = src.count_valid();
  if constexpr (kFinal) {
    RowOut out{p.out + r * p.out_row_stride, p.k, p.sorted};
    select_topk(s, src, n_valid, uint32_t(p.k), out);
  } else {
    SegOut out = seg_out.at(r, g);
    select_topk(s, src, n_valid, uint32_t(p.k), out);
  }
}

struct Plan {
  int64_t G;       // chunks per row (1: one block per row, no workspace)
  int64_t segs_a;  // per row: chunk segments
  int64_t segs_b;  // per row: first merge level's segments
};

int num_sms_of_current_device() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 132;
  }
  return sms;
}

Plan plan(const TopkParams& p) {
  int64_t G = 1;
  if (const char* forced = std::getenv("INDEXCACHE_TOPK_SPLIT"); forced && *forced) {
    G = std::clamp<int64_t>(std::atoll(forced), 1, kMaxSplit);
  } else {
    const int64_t sms = num_sms_of_current_device();
    if (p.R > 0 && p.R < sms && p.C > kSplitMinCols) {
      // At most two blocks per SM (one wave), chunks of at least kChunkMin columns.
      G = std::min((p.C + kChunkMin - 1) / kChunkMin, std::max<int64_t>(1, 2 * sms / p.R));
      G = std::clamp<int64_t>(G, 1, kMaxSplit);
    }
  }
  if (G == 1) return Plan{1, 0, 0};
  return Plan{G, G, G > kFinalSegs ? (G + kMergeFan - 1) / kMergeFan : 0};
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// Workspace layout: keys A | columns A | keys B | columns B | counts A | counts B.
struct Layout {
  size_t keys_a, idx_a, keys_b, idx_b, counts_a, counts_b, bytes;
};

Layout layout(const TopkParams& p, const Plan& pl) {
  const size_t a = size_t(p.R * pl.segs_a), b = size_t(p.R * pl.segs_b);
  Layout l{};
  l.keys_a = 0;
  l.idx_a = l.keys_a + align_up(a * kSegCap * 4);
  l.keys_b = l.idx_a + align_up(a * kSegCap * 4);
  l.idx_b = l.keys_b + align_up(b * kSegCap * 4);
  l.counts_a = l.idx_b + align_up(b * kSegCap * 4);
  l.counts_b = l.counts_a + align_up(a * 4);
  l.bytes = l.counts_b + align_up(b * 4);
  return l;
}

constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // gridDim.x

template <class Kernel>
cudaError_t allow_smem(Kernel kernel) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(kSmemBytes));
}

}  // namespace

namespace cuda {

int64_t topk_workspace_bytes(const TopkParams& p) {
  if (p.R == 0) return 0;
  const Plan pl = plan(p);
  return pl.G == 1 ? 0 : int64_t(layout(p, pl).bytes);
}

cudaError_t topk(const TopkParams& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  const Plan pl = plan(p);
  if (p.R * pl.G > kMaxBlocks) return cudaErrorInvalidConfiguration;
  cudaError_t err;
  if (pl.G == 1) {
    if ((err = allow_smem(topk_logits_kernel<false>)) != cudaSuccess) return err;
    topk_logits_kernel<false><<<unsigned(p.R), kThreads, kSmemBytes, stream>>>(p, 1, SegBuf{});
    return cudaGetLastError();
  }
  const Layout l = layout(p, pl);
  if (p.workspace == nullptr || p.workspace_bytes < int64_t(l.bytes)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(p.workspace);
  SegBuf a{reinterpret_cast<uint32_t*>(ws + l.keys_a), reinterpret_cast<uint32_t*>(ws + l.idx_a),
           reinterpret_cast<int32_t*>(ws + l.counts_a), pl.segs_a};
  SegBuf b{reinterpret_cast<uint32_t*>(ws + l.keys_b), reinterpret_cast<uint32_t*>(ws + l.idx_b),
           reinterpret_cast<int32_t*>(ws + l.counts_b), pl.segs_b};
  if ((err = allow_smem(topk_logits_kernel<true>)) != cudaSuccess) return err;
  if ((err = allow_smem(topk_merge_kernel<false>)) != cudaSuccess) return err;
  if ((err = allow_smem(topk_merge_kernel<true>)) != cudaSuccess) return err;

  topk_logits_kernel<true><<<unsigned(p.R * pl.G), kThreads, kSmemBytes, stream>>>(p, int(pl.G), a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // Level outputs alternate a -> b -> a: level 2 has ceil(G / fan) <= segs_b segments per row,
  // level 3 ceil(G / fan^2) <= G.
  int64_t nseg = pl.G;
  SegBuf cur = a, other = b;
  while (nseg > kFinalSegs) {
    const int64_t groups = (nseg + kMergeFan - 1) / kMergeFan;
    topk_merge_kernel<false><<<unsigned(p.R * groups), kThreads, kSmemBytes, stream>>>(
        p, cur, int(nseg), kMergeFan, other);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    nseg = groups;
    std::swap(cur, other);
  }
  topk_merge_kernel<true><<<unsigned(p.R), kThreads, kSmemBytes, stream>>>(p, cur, int(nseg),
                                                                          int(nseg), SegBuf{});
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace indexcache
