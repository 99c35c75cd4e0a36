// Lightning-indexer scores, paged decode form, on SM90 FP8 tensor cores. Output row (b, j) =
// b * next_n + j scores positions [0, context_lens[b] - next_n + j + 1) of sequence b against its
// paged keys, -inf elsewhere. Building blocks and the design rationale: indexer_sm90.cuh.
//
// NOTES:
// - The cache is DeepGEMM's: a page holds 64 rows of D e4m3 bytes, then 64 fp32 scales. A page is
//   exactly one wgmma M = 64, so a tile is 4 pages, one per math warpgroup, each fetched by its own
//   3D TMA load ({D, 64 rows, page}) at the page id from the block table. The scales are read by
//   the math threads straight from global memory (one float per lane per page).
// - Work item = one sequence: its Q (next_n x H rows, as one or two 128-row groups) is loaded once
//   and its ceil(pages / 4) tiles are spread over the CTAs by the balanced schedule, so a batch of
//   very different context lengths still keeps every SM streaming. Memory-bound: the ring of
//   kKVStages tiles keeps ~128 KB of loads in flight per SM.
// - Never reads past a sequence's length: block-table entries at or beyond ceil(len / 64) pages
//   (or beyond max_pages_per_seq) are not read, page ids outside [0, num_pages) are not loaded and
//   their positions score -inf, exactly as on the CPU. Lengths are clamped to max_context_len.
// - Positions from the sequence's last page on (beyond its tiles) get -inf from a strided fill pass
//   of the CTA that owns the sequence for filling; tiles write all of their positions below
//   max_context_len. Offsets into out are 64-bit.
// - Measured on the development H100 (median of 20): B = 64, context 65536, next_n = 1, H = 64,
//   D = 128: 239 us = 2.39 TB/s (81 % of the same-run copy ceiling 2.97 TB/s). next_n = 4 (two
//   Q groups per page, the weights reloaded per group) drops to 1.07 TB/s: there the fold, not
//   HBM, is the limit.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "indexcache/params.h"
#include "indexer/indexer_sm90.cuh"
#include "ops/backends.h"

namespace indexcache {
namespace {

using namespace indexer_sm90;

constexpr int kPagesPerTile = 4;

template <int kHeads>
constexpr int max_query_groups() {
  return (kMaxNextN * kHeads + 127) / 128;
}

struct SeqPages {
  int len;    // context_lens[b] as given
  int pages;  // pages scored: ceil(min(max(len, 0), max_context_len) / 64), at most the table's
  int tiles;  // ceil(pages / 4)
};

__device__ __forceinline__ SeqPages seq_pages(const IndexerLogitsPagedParams& p, int b) {
  const int len = __ldg(p.context_lens + b);
  const int64_t end = cmin<int64_t>(cmax(len, 0), p.max_context_len);
  const int pages = static_cast<int>(cmin<int64_t>(ceil_div<int64_t>(end, kPageSize),
                                                   p.max_pages_per_seq));
  return {len, pages, ceil_div(pages, kPagesPerTile)};
}

// End of the visible positions of row (b, j): clamp(len - next_n + j + 1, 0, max_context_len).
__device__ __forceinline__ int row_end(const IndexerLogitsPagedParams& p, int len, int j) {
  const int64_t e = int64_t(len) - p.next_n + j + 1;
  return static_cast<int>(cmin<int64_t>(cmax<int64_t>(e, 0), p.max_context_len));
}

// Page id of page `page` of sequence b, or -1 when it names no page of the cache.
__device__ __forceinline__ int page_id(const IndexerLogitsPagedParams& p, int b, int page) {
  const int id = __ldg(p.block_table + int64_t(b) * p.block_table_row_stride + page);
  return id >= 0 && id < p.num_pages ? id : -1;
}

template <int kHeads, int kHeadDim>
__global__ void __launch_bounds__(Config<kHeads, kHeadDim, max_query_groups<kHeads>()>::kThreads, 1)
    indexer_logits_paged_kernel(const IndexerLogitsPagedParams p,
                                const __grid_constant__ CUtensorMap tmap_q,
                                const __grid_constant__ CUtensorMap tmap_kv) {
  using C = Config<kHeads, kHeadDim, max_query_groups<kHeads>()>;
  static_assert(C::kMmaM == kPageSize && C::kMathWarpgroups == kPagesPerTile,
                "one page per math warpgroup");
  extern __shared__ uint8_t smem_raw[];
  const SmemLayout<C> smem(smem_raw);
  if (threadIdx.x == 0) smem.init_barriers();

  const TileRange range = balanced_range<C::kThreads>(
      p.B, [&](int64_t b) -> int64_t { return seq_pages(p, static_cast<int>(b)).tiles; },
      smem.scratch);
  const int q_groups = ceil_div(p.next_n, C::kQueriesPerGroup);

  if (threadIdx.x >= C::kMathThreads) {
    // ---------------- producer warpgroup: one lane drives TMA ----------------
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegisters>();
    if (threadIdx.x == C::kMathThreads) {
      int q_iter = 0, kv_iter = 0;
      int b = static_cast<int>(range.item), first = static_cast<int>(range.first_tile);
      int left = static_cast<int>(range.count);
      while (left > 0) {
        const SeqPages seq = seq_pages(p, b);
        const int take = min(seq.tiles - first, left);
        if (take > 0) {
          const Ring<C::kQStages> qr(q_iter++);
          Barrier::wait(&smem.empty_q[qr.stage], qr.phase ^ 1);
          Barrier::arrive_and_expect_tx(&smem.full_q[qr.stage], q_groups * C::kQGroupBytes);
          for (int grp = 0; grp < q_groups; ++grp) {
            cute::SM90_TMA_LOAD_2D::copy(
                &tmap_q, &smem.full_q[qr.stage], kTmaCacheHint,
                smem.q + qr.stage * C::kQStageBytes + grp * C::kQGroupBytes, 0,
                (b * p.next_n + grp * C::kQueriesPerGroup) * kHeads);
          }
          for (int t = first; t < first + take; ++t) {
            const Ring<C::kKVStages> kr(kv_iter++);
            Barrier::wait(&smem.empty_kv[kr.stage], kr.phase ^ 1);
            int ids[kPagesPerTile];
            uint32_t bytes = 0;
#pragma unroll
            for (int i = 0; i < kPagesPerTile; ++i) {
              const int page = t * kPagesPerTile + i;
              ids[i] = page < seq.pages ? page_id(p, b, page) : -1;
              bytes += ids[i] >= 0 ? C::kSubTileBytes : 0;
            }
            Barrier::arrive_and_expect_tx(&smem.full_kv[kr.stage], bytes);
#pragma unroll
            for (int i = 0; i < kPagesPerTile; ++i) {
              if (ids[i] >= 0) {
                cute::SM90_TMA_LOAD_3D::copy(
                    &tmap_kv, &smem.full_kv[kr.stage], kTmaCacheHint,
                    smem.kv + kr.stage * C::kTileBytes + i * C::kSubTileBytes, 0, 0, ids[i]);
              }
            }
          }
          left -= take;
        }
        first = 0;
        ++b;
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
    cutlass::arch::warpgroup_reg_alloc<C::kMathRegisters>();
    const int ctid = threadIdx.x;
    const int wg = ctid / 128;
    const LanePlace lp(ctid % 128);
    constexpr float kNegInf = -INFINITY;
    const int64_t page_bytes = int64_t(kPageSize) * (kHeadDim + 4);

    // -inf from the end of each owned sequence's pages to max_context_len.
    for (int b = blockIdx.x; b < p.B; b += gridDim.x) {
      const SeqPages seq = seq_pages(p, b);
      const int64_t from = cmin<int64_t>(int64_t(seq.pages) * kPageSize, p.max_context_len);
      for (int j = 0; j < p.next_n; ++j) {
        float* row = p.out + (int64_t(b) * p.next_n + j) * p.out_row_stride;
        for (int64_t s = from + ctid; s < p.max_context_len; s += C::kMathThreads) row[s] = kNegInf;
      }
    }

    const uint32_t q_smem = smem_addr(smem.q);
    const uint32_t kv_smem = smem_addr(smem.kv) + wg * C::kSubTileBytes;
    float acc[C::kAccum];
    float w[C::kAccum / 2];
    auto load_group_weights = [&](int b, int grp) {
      load_weights<C>(w, lp.quad, [&](int q) -> const float* {
        const int j = grp * C::kQueriesPerGroup + q;
        return j < p.next_n ? p.weights + (int64_t(b) * p.next_n + j) * kHeads : nullptr;
      });
    };
    int q_iter = 0, kv_iter = 0;
    int b = static_cast<int>(range.item), first = static_cast<int>(range.first_tile);
    int left = static_cast<int>(range.count);
    while (left > 0) {
      const SeqPages seq = seq_pages(p, b);
      const int take = min(seq.tiles - first, left);
      if (take > 0) {
        if (q_groups == 1) load_group_weights(b, 0);
        const Ring<C::kQStages> qr(q_iter++);
        Barrier::wait(&smem.full_q[qr.stage], qr.phase);
        const uint32_t q_stage = q_smem + qr.stage * C::kQStageBytes;

        for (int t = first; t < first + take; ++t) {
          const int page = t * kPagesPerTile + wg;
          const bool active = page < seq.pages;  // uniform over the warpgroup
          const int id = active ? page_id(p, b, page) : -1;
          const float key_scale =
              id >= 0 ? __ldg(reinterpret_cast<const float*>(p.kv_cache + id * page_bytes +
                                                             kPageSize * kHeadDim) +
                              lp.row)
                      : 0.0f;
          const int pos = page * kPageSize + lp.row;
          const Ring<C::kKVStages> kr(kv_iter++);
          Barrier::wait(&smem.full_kv[kr.stage], kr.phase);
          if (active) {
            for (int grp = 0; grp < q_groups; ++grp) {
              float score[C::kQueriesPerLane];
#pragma unroll
              for (int g = 0; g < C::kQueriesPerLane; ++g) score[g] = 0.0f;
              if (id >= 0) {
                if (q_groups > 1) load_group_weights(b, grp);
                mma_tile<C>(kv_smem + kr.stage * C::kTileBytes, q_stage + grp * C::kQGroupBytes,
                            acc);
                head_reduce<C>(acc, w, lp, score);
              }
              if (pos < p.max_context_len) {
#pragma unroll
                for (int g = 0; g < C::kQueriesPerLane; ++g) {
                  const int j = grp * C::kQueriesPerGroup + 2 * g + lp.b1;
                  if (j < p.next_n) {
                    const bool visible = id >= 0 && pos < row_end(p, seq.len, j);
                    p.out[(int64_t(b) * p.next_n + j) * p.out_row_stride + pos] =
                        visible ? score[g] * key_scale : kNegInf;
                  }
                }
              }
            }
          }
          Barrier::arrive(&smem.empty_kv[kr.stage]);
        }
        Barrier::arrive(&smem.empty_q[qr.stage]);
        left -= take;
      }
      first = 0;
      ++b;
    }
  }
}

template <int kHeads, int kHeadDim>
cudaError_t launch(const IndexerLogitsPagedParams& p, cudaStream_t stream) {
  using C = Config<kHeads, kHeadDim, max_query_groups<kHeads>()>;
  CUtensorMap tmap_q, tmap_kv;
  {
    const uint64_t dims[2] = {uint64_t(kHeadDim), uint64_t(p.B) * p.next_n * kHeads};
    const uint64_t strides[1] = {uint64_t(kHeadDim)};
    const uint32_t box[2] = {uint32_t(kHeadDim), uint32_t(C::kMmaN)};
    const cudaError_t e = encode_rows_map(&tmap_q, p.q, 2, dims, strides, box, kHeadDim);
    if (e != cudaSuccess) return e;
  }
  if (p.num_pages > 0) {
    const uint64_t dims[3] = {uint64_t(kHeadDim), uint64_t(kPageSize), uint64_t(p.num_pages)};
    const uint64_t strides[2] = {uint64_t(kHeadDim), uint64_t(kPageSize) * (kHeadDim + 4)};
    const uint32_t box[3] = {uint32_t(kHeadDim), uint32_t(kPageSize), 1};
    const cudaError_t e = encode_rows_map(&tmap_kv, p.kv_cache, 3, dims, strides, box, kHeadDim);
    if (e != cudaSuccess) return e;
  } else {
    std::memset(&tmap_kv, 0, sizeof(tmap_kv));  // no page id is valid: never used
  }
  int sms = 0;
  cudaError_t e = current_device_sms(&sms);
  if (e != cudaSuccess) return e;
  const int64_t table_len =
      cmin<int64_t>(p.max_context_len, int64_t(p.max_pages_per_seq) * kPageSize);
  const int64_t max_tiles =
      int64_t(p.B) * ceil_div<int64_t>(ceil_div<int64_t>(table_len, kPageSize), kPagesPerTile);
  const int64_t work = cmax<int64_t>(p.B, max_tiles);  // fill passes need a CTA per sequence
  const int grid = static_cast<int>(cmax<int64_t>(1, cmin<int64_t>(sms, work)));

  auto kernel = indexer_logits_paged_kernel<kHeads, kHeadDim>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, tmap_q, tmap_kv);
  return cudaGetLastError();
}

}  // namespace

namespace cuda {

cudaError_t indexer_logits_paged(const IndexerLogitsPagedParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.max_context_len == 0) return cudaSuccess;
  return indexer_sm90::dispatch_heads_and_dim(p.H, p.D, [&](auto heads, auto head_dim) {
    return launch<decltype(heads)::value, decltype(head_dim)::value>(p, stream);
  });
}

}  // namespace cuda
}  // namespace indexcache
