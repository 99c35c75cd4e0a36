// Row-level building blocks that more than one CPU op file needs: the reproducible float dot
// product, clamped key windows, paged-cache addressing, and the indexer's one-row scorers
// (indexer.cpp defines them, topk.cpp's fused indexer_topk reuses them so the [S, N] scores never
// exist).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "indexcache/params.h"

namespace indexcache {
namespace cpu {

// Written outside windows and as the lse of a row with nothing to attend to.
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Float dot product in a fixed order: 16 interleaved partial sums folded by a fixed tree, so the
// result does not depend on threads or runs, and the independent lanes still vectorise.
inline float dot(const float* a, const float* b, int n) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += a[i + l] * b[i + l];
  for (; i < n; ++i) lane[i % kLanes] += a[i] * b[i];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  return lane[0];
}

// Half-open range of visible columns of one row.
struct Window {
  int64_t begin;
  int64_t end;
};

// [start, end) cut to [0, len); end <= start is an empty window.
inline Window clamp_window(int64_t start, int64_t end, int64_t len) {
  const int64_t begin = std::min(std::max<int64_t>(start, 0), len);
  return {begin, std::min(std::max(end, begin), len)};
}

// Page of the cache holding `position` of a sequence whose block-table row is `pages`; -1 when
// the table has no entry for it or the entry names no page of the cache.
inline int64_t page_of_position(const int32_t* pages, int max_pages_per_seq, int64_t num_pages,
                                int64_t position) {
  const int64_t slot = position / kPageSize;
  if (position < 0 || slot >= max_pages_per_seq) return -1;
  const int64_t page = pages[slot];
  return page >= 0 && page < num_pages ? page : -1;
}

// DeepGEMM's indexer K cache: each page holds 64 rows of D e4m3 bytes, then their 64 fp32 scales.
struct IndexerCacheLayout {
  int D;
  int64_t page_bytes() const { return int64_t(kPageSize) * (D + 4); }
  int64_t key_offset(int64_t page, int64_t row) const { return page * page_bytes() + row * D; }
  int64_t scale_offset(int64_t page, int64_t row) const {
    return page * page_bytes() + int64_t(kPageSize) * D + row * int64_t(sizeof(float));
  }
};

// Byte layout of the MLA cache rows: bf16 rows are the 576 values; FP8 rows are
// 512 e4m3 | 4 fp32 scales | 64 bf16 rope.
constexpr int kMlaBf16RowBytes = kMlaDimQK * 2;
constexpr int kMlaFp8ScalesOffset = kMlaDimLatent;
constexpr int kMlaFp8RopeOffset = kMlaFp8RowBytes - kMlaDimRope * 2;

// Per-thread buffers of the indexer scorers: one query's heads and one key, decoded to float.
struct IndexerRowScratch {
  IndexerRowScratch(int H, int D) : q(static_cast<size_t>(H) * D), k(static_cast<size_t>(D)) {}
  std::vector<float> q;
  std::vector<float> k;
};

// Writes query row t's scores into row[begin, end) of its window (row is indexed by absolute key)
// and returns the window; row entries outside it are left untouched.
Window score_indexer_row(const IndexerLogitsParams& p, int64_t t, float* row,
                         IndexerRowScratch& scratch);

// Same for output row r = b * next_n + j of the paged form; positions whose block-table entry
// names no page of the cache score -inf.
Window score_indexer_paged_row(const IndexerLogitsPagedParams& p, int64_t r, float* row,
                               IndexerRowScratch& scratch);

// Either scorer above, for code generic over the two indexer forms.
template <class Params>
using ScoreRowFn = Window (*)(const Params&, int64_t, float*, IndexerRowScratch&);

}  // namespace cpu
}  // namespace indexcache
