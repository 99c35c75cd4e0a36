// The CUDA ragged (prefill) indexer_topk as the op layer calls it: the route, the workspace it
// needs, and the launches. Torch-free; design in pipeline.cu's NOTES.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/params.h"

namespace indexcache {
namespace indexer_topk {

// Bytes of fp32 scores a bounded-chunk route (this one, and the paged form's in the op layer)
// holds at once; also the bound of the sampled route's per-chunk workspace.
constexpr int64_t kScoreWorkspaceBytes = int64_t{128} << 20;

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
