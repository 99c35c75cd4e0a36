// The stages of the ragged (prefill) indexer_topk on CUDA, as pipeline.cu runs them; torch-free.
// Their design, costs and measurements: pipeline.cu's NOTES.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/params.h"

namespace indexcache {
namespace indexer_topk {

// Key s is sampled when s % kSampleStride == 0. A row's candidates are compared as
// candidate_key(score, s): the order key in the high word, ~s in the low one, so that every key
// of a row is distinct and larger means (higher score, then smaller index): the top-k rule.
constexpr int kSampleStride = 32;
// Candidates a row can hold. With the sampled threshold a random row keeps ~3.6 K (pipeline.cu).
constexpr int kCandidateCap = 6144;
// Standard deviations of the sampled count that the threshold keeps above k.
constexpr float kSampleMargin = 6.0f;

__host__ __device__ inline int64_t sampled_keys(int64_t n) {
  return (n + kSampleStride - 1) / kSampleStride;
}

// Stage 1: the sampled keys (every kSampleStride-th row of k and k_scale) and each query's
// window over them, [ceil(begin / stride), ceil(end / stride)) of its clamped window; zeroes
// *failed.
struct SampleKeysParams {
  const uint8_t* k;          // [N, D]
  const float* k_scale;      // [N]
  const int32_t* ks;         // [S]
  const int32_t* ke;         // [S]
  int64_t S;
  int64_t N;
  int D;
  uint8_t* k_sample;         // [sampled_keys(N), D]
  float* k_scale_sample;     // [sampled_keys(N)]
  int32_t* ks_sample;        // [S]
  int32_t* ke_sample;        // [S]
  int32_t* failed;
};

// Stage 3, per row r of a chunk: from the row's sampled scores, the threshold its candidates
// must reach (0: every visible key), and counts[r] = 0.
struct ThresholdParams {
  const float* sample_scores;  // [R, Ns], row stride Ns
  int64_t Ns;
  const int32_t* ks;           // [R] the query windows over all N keys
  const int32_t* ke;
  const int32_t* ks_sample;    // [R] the same windows over the sampled keys
  const int32_t* ke_sample;
  int64_t R;
  int64_t N;
  int k;
  uint64_t* thresholds;        // [R]
  int32_t* counts;             // [R]
};

// Stage 4: the indexer over every key of the chunk's rows, keeping the keys whose candidate_key
// reaches the row's threshold: candidates[r, 0 : min(counts[r], kCandidateCap)) in no particular
// order, counts[r] their number (possibly above the cap: then the row failed).
struct CandidatesParams {
  IndexerLogitsParams scores;  // out unused
  const uint64_t* thresholds;  // [R]
  int32_t* counts;             // [R], zero on entry
  uint64_t* candidates;        // [R, kCandidateCap]
};

// Stage 5, per row: the top k of the candidates into out, in (score desc, key asc) order when
// sorted, else in ascending key order, -1 padded. A row whose candidates cannot answer (more
// than the cap, or fewer than k with a sampled threshold) is left to the fallback: *failed = 1.
struct SelectParams {
  const uint64_t* candidates;
  const int32_t* counts;
  const uint64_t* thresholds;
  const int32_t* ks;         // [R] the query windows (clamped to [0, N] here)
  const int32_t* ke;
  int64_t N;
  int64_t R;
  int32_t* out;
  int64_t out_row_stride;
  int k;
  bool sorted;
  int32_t* failed;
};

cudaError_t sample_keys(const SampleKeysParams& p, cudaStream_t stream);
cudaError_t thresholds(const ThresholdParams& p, cudaStream_t stream);
cudaError_t candidates(const CandidatesParams& p, cudaStream_t stream);
cudaError_t select(const SelectParams& p, cudaStream_t stream);

}  // namespace indexer_topk
}  // namespace indexcache
