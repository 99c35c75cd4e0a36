// The CUDA ragged (prefill) indexer_topk as the op layer calls it: the route, the workspace it
// needs, and the launches. Torch-free; design in pipeline.cu's NOTES.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "indexcache/params.h"

namespace indexcache {
namespace indexer_topk {

// Bytes of fp32 scores a bounded-chunk route (this one, and the paged form's in the op layer)
// holds at once; also the bound of the sampled route's per-chunk workspace.
constexpr int64_t kScoreWorkspaceBytes = int64_t{128} << 20;

// Units (rows, or batches of rows) per chunk when `units` units are processed in chunks of at
// most `limit`: at least one, and as even as the bound allows, so that a call never ends with a
// nearly empty chunk that pays a whole launch sequence (255 + 1 batches became 128 + 128).
inline int64_t balanced_chunk(int64_t units, int64_t limit) {
  if (units <= 0) return 0;
  limit = std::clamp<int64_t>(limit, 1, units);
  const int64_t chunks = (units + limit - 1) / limit;
  return (units + chunks - 1) / chunks;
}

// The radix top-k over `rows` rows of contiguous fp32 scores of `row_len` columns, windows
// [starts, ends) (nullptr: the whole row), into out; run_if as TopkParams::run_if.
inline TopkParams topk_over_scores(const float* scores, int64_t rows, int64_t row_len,
                                   const int32_t* starts, const int32_t* ends, int32_t* out,
                                   int64_t out_row_stride, int k, bool sorted,
                                   const int32_t* run_if = nullptr) {
  TopkParams t{};
  t.logits = scores;
  t.row_starts = starts;
  t.row_ends = ends;
  t.out = out;
  t.R = rows;
  t.C = row_len;
  t.logits_row_stride = row_len;
  t.out_row_stride = out_row_stride;
  t.k = k;
  t.sorted = sorted;
  t.run_if = run_if;
  return t;
}

// kAuto picks by shape (pipeline.cu); the others force a route (tests, benchmarks).
enum class Route { kAuto, kChunked, kSampled };

// Bytes of device workspace run() needs for p: at most ~128 MiB plus N / 32 x (D + 4) + 8 S.
int64_t workspace_bytes(const IndexerTopkParams& p, Route route);

// Enqueues the op on `stream` with `workspace` (256-byte aligned, workspace_bytes(p, route)
// bytes, contents irrelevant); never synchronises.
cudaError_t run(const IndexerTopkParams& p, Route route, void* workspace, cudaStream_t stream);

}  // namespace indexer_topk
}  // namespace indexcache
