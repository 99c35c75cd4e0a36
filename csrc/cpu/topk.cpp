// CPU top-k over row windows, and the fused indexer top-k that scores one row at a time into a
// per-thread buffer and selects from it with the same routine.
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/row_kernels.h"
#include "indexcache/numeric.h"
#include "ops/backends.h"

namespace indexcache {
namespace cpu {
namespace {

// A candidate ranked by one integer: the value's order key above the bitwise-inverted column, so
// a larger rank is a larger value or, on a tie, a smaller column. Ranks are all distinct, which
// makes the selected set unique.
uint64_t rank_of(float value, int64_t column) {
  return (uint64_t(topk_order_key(value)) << 32) | uint64_t(~uint32_t(column));
}

int32_t column_of(uint64_t rank) { return int32_t(~uint32_t(rank)); }

// Writes the k best columns of values[window] into out[0, k), -1 padded. Sorted output is by
// descending rank; unsorted output lists the set in ascending column order, which keeps it
// deterministic and is free when the whole window fits.
void select_topk(const float* values, Window window, int k, bool sorted, int32_t* out,
                 std::vector<uint64_t>& ranks) {
  const int64_t n = window.end - window.begin;
  const int64_t taken = std::min<int64_t>(n, k);
  if (n <= k && !sorted) {
    for (int64_t i = 0; i < n; ++i) out[i] = int32_t(window.begin + i);
  } else {
    ranks.resize(n);
    for (int64_t i = 0; i < n; ++i) ranks[i] = rank_of(values[window.begin + i], window.begin + i);
    // O(n) selection; only the k winners are ever sorted.
    if (n > k) std::nth_element(ranks.begin(), ranks.begin() + k, ranks.end(), std::greater<>());
    if (sorted) std::sort(ranks.begin(), ranks.begin() + taken, std::greater<>());
    for (int64_t i = 0; i < taken; ++i) out[i] = column_of(ranks[i]);
    if (!sorted) std::sort(out, out + taken);
  }
  std::fill(out + taken, out + k, -1);
}

// One row handed to the selection: values indexed by absolute column, and the visible window.
struct ScoredRow {
  const float* values;
  Window window;
};

// Row-parallel selection. make_row_source() is called once per thread chunk and returns a
// callable r -> ScoredRow that may own per-thread buffers.
template <class MakeRowSource>
void select_rows(int64_t rows, int32_t* out, int64_t out_row_stride, int k, bool sorted,
                 const MakeRowSource& make_row_source) {
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    auto row_source = make_row_source();
    std::vector<uint64_t> ranks;
    for (int64_t r = first; r < last; ++r) {
      const ScoredRow row = row_source(r);
      select_topk(row.values, row.window, k, sorted, out + r * out_row_stride, ranks);
    }
  });
}

// Fused indexer top-k for either indexer form: each thread scores into one row of row_len floats.
template <class FusedParams, class ScoreParams>
void select_scored_rows(const FusedParams& p, int64_t rows, int64_t row_len,
                        ScoreRowFn<ScoreParams> score_row) {
  const ScoreParams& s = p.scores;
  select_rows(rows, p.out, p.out_row_stride, p.k, p.sorted, [&] {
    return [&s, score_row, scores = std::vector<float>(row_len),
            scratch = IndexerRowScratch(s.H, s.D)](int64_t r) mutable {
      return ScoredRow{scores.data(), score_row(s, r, scores.data(), scratch)};
    };
  });
}

}  // namespace

void topk(const TopkParams& p) {
  select_rows(p.R, p.out, p.out_row_stride, p.k, p.sorted, [&p] {
    return [&p](int64_t r) {
      const Window window = clamp_window(p.row_starts ? p.row_starts[r] : 0,
                                         p.row_ends ? p.row_ends[r] : p.C, p.C);
      return ScoredRow{p.logits + r * p.logits_row_stride, window};
    };
  });
}

void indexer_topk(const IndexerTopkParams& p) {
  select_scored_rows(p, p.scores.S, p.scores.N, &score_indexer_row);
}

void indexer_topk_paged(const IndexerTopkPagedParams& p) {
  select_scored_rows(p, int64_t(p.scores.B) * p.scores.next_n, p.scores.max_context_len,
                     &score_indexer_paged_row);
}

}  // namespace cpu
}  // namespace indexcache
