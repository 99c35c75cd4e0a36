// The ragged (prefill) indexer_topk on CUDA: which route serves a call, its workspace, and the
// launches. Torch-free: the op layer allocates workspace_bytes() and calls run().
//
// NOTES:
// - Sampled route (no [S, N] anywhere), per chunk of rows:
//     1. sample_keys (once per call): every 32nd key and each window over them;
//     2. indexer_logits over the sampled keys: [rows, N / 32] scores (3 % of the MMA work);
//     3. thresholds: per row, the sampled key at rank lambda + 6 sqrt(lambda) + 2, where lambda
//        is k's share of the sample; with a random arrangement of scores the window then holds
//        ~k + 6 sqrt(32 k) + 64 ~ 3.6 K keys at or above it (k = 2048), and fewer than k only
//        if the sample is 6 standard deviations off;
//     4. candidates (candidates.cu): the indexer over every key, keeping the keys at or above the
//        threshold, with their exact scores, in a [rows, 6144] list;
//     5. select: the exact top k of each row's list.
//   Scores are bit-identical to indexer_logits' (same device code), so the result equals
//   topk(indexer_logits(...)) exactly whenever a row's list holds its top k: when the list holds
//   at least k keys at or above a threshold and did not overflow. select checks both on exact
//   counts; a row where either fails (a sample that misleads, e.g. scores periodic in the
//   stride) raises a flag, and the bounded-chunk route then runs for the whole call, each of its
//   launches a no-op unless the flag is set (read on the device: no host synchronisation,
//   CUDA-graph safe). Rows recomputed there get the same answer, so no row is ever wrong; a call
//   with a failed row costs about twice.
// - Bounded-chunk route: indexer_logits into a score workspace of at most kScoreWorkspaceBytes,
//   then the radix top-k, chunk after chunk. It serves shapes where the sampled route's extra
//   stages do not pay (little work per call) and is the sampled route's fallback.
// - Workspace: the sampled keys and windows (N / 32 x (D + 4) + 8 S bytes), then one body of at
//   most kScoreWorkspaceBytes (one row at least) shared by the sampled stages and the fallback's
//   scores, which run after every select has read its lists. It never grows with N beyond that.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "indexcache/params.h"
#include "indexer_topk/pipeline.h"
#include "indexer_topk/stages.h"
#include "ops/backends.h"

namespace indexcache {
namespace indexer_topk {
namespace {

constexpr int64_t kAlign = 256;
// The sampled route pays where the top-k pass it saves is large against its own fixed costs
// per row (the sample, the threshold, the select of ~3.6 K candidates): at least this many
// scores per call, and this much indexer work per row (N x H). H200 sweep at f56a5bd, against
// the two-kernel path: N x H = 2^20 (H = 32, N = 32 K) 0.89-0.92x; 2^21 0.98-1.06x; 2^22 and
// up 1.02-1.07x.
constexpr int64_t kSampledMinScores = int64_t{1} << 26;
constexpr int64_t kSampledMinRowWork = int64_t{1} << 21;

int64_t aligned(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

struct Layout {
  bool sampled;
  int64_t ns;              // sampled keys
  int64_t rows;            // per chunk of the sampled stages
  int64_t fallback_rows;   // per chunk of scores
  int64_t k_sample, k_scale_sample, ks_sample, ke_sample, failed;
  int64_t body;            // start of the shared body
  int64_t thresholds, counts, candidates, sample_scores;  // offsets within the body
  int64_t total;
};

Layout layout(const IndexerTopkParams& p, Route route) {
  const IndexerLogitsParams& s = p.scores;
  Layout l{};
  l.sampled = route == Route::kSampled ||
              (route == Route::kAuto && s.S * s.N >= kSampledMinScores &&
               s.N * s.H >= kSampledMinRowWork);
  l.fallback_rows =
      balanced_chunk(s.S, kScoreWorkspaceBytes / (4 * std::max<int64_t>(s.N, 1)));
  int64_t body = l.fallback_rows * s.N * 4;
  int64_t head = 0;
  if (l.sampled) {
    l.ns = sampled_keys(s.N);
    const int64_t per_row = 8 + 4 + 8 * int64_t{kCandidateCap} + 4 * l.ns;
    l.rows = balanced_chunk(s.S, (kScoreWorkspaceBytes - 4 * kAlign) / per_row);
    l.k_sample = head;
    head += aligned(l.ns * s.D);
    l.k_scale_sample = head;
    head += aligned(l.ns * 4);
    l.ks_sample = head;
    head += aligned(s.S * 4);
    l.ke_sample = head;
    head += aligned(s.S * 4);
    l.failed = head;
    head += kAlign;
    l.thresholds = 0;
    l.counts = aligned(l.rows * 8);
    l.candidates = l.counts + aligned(l.rows * 4);
    l.sample_scores = l.candidates + aligned(l.rows * 8 * int64_t{kCandidateCap});
    body = std::max(body, l.sample_scores + aligned(l.rows * 4 * l.ns));
  }
  l.body = head;
  l.total = head + body;
  return l;
}

IndexerLogitsParams rows_of(const IndexerLogitsParams& all, int64_t row0, int64_t rows) {
  IndexerLogitsParams part = all;
  part.q += row0 * all.H * all.D;
  part.weights += row0 * all.H;
  part.ks += row0;
  part.ke += row0;
  part.S = rows;
  return part;
}

// The bounded-chunk route (or, with run_if, the sampled route's fallback).
cudaError_t run_chunked(const IndexerTopkParams& p, float* scores, int64_t chunk,
                        const int32_t* run_if, cudaStream_t stream) {
  const IndexerLogitsParams& all = p.scores;
  for (int64_t row0 = 0; row0 < all.S; row0 += chunk) {
    IndexerLogitsParams part = rows_of(all, row0, std::min(chunk, all.S - row0));
    part.out = scores;
    part.out_row_stride = all.N;
    part.run_if = run_if;
    if (const cudaError_t e = cuda::indexer_logits(part, stream); e != cudaSuccess) return e;
    const TopkParams t = topk_over_scores(scores, part.S, all.N, part.ks, part.ke,
                                          p.out + row0 * p.out_row_stride, p.out_row_stride,
                                          p.k, p.sorted, run_if);
    if (const cudaError_t e = cuda::topk(t, stream); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

int64_t workspace_bytes(const IndexerTopkParams& p, Route route) {
  if (p.scores.S == 0 || p.scores.N == 0) return 0;
  return layout(p, route).total;
}

cudaError_t run(const IndexerTopkParams& p, Route route, void* workspace, cudaStream_t stream) {
  const IndexerLogitsParams& all = p.scores;
  if (all.S == 0) return cudaSuccess;
  if (all.N == 0) {  // no key at all (and no tensor map over zero rows): every row is -1
    // A single row's stride is arbitrary (the op only checks it between rows), and a pitch below
    // the width is an error for the memset.
    const size_t width = size_t(p.k) * sizeof(int32_t);
    const size_t pitch = all.S > 1 ? size_t(p.out_row_stride) * sizeof(int32_t) : width;
    return cudaMemset2DAsync(p.out, pitch, 0xFF, width, size_t(all.S), stream);
  }
  const Layout l = layout(p, route);
  auto* base = static_cast<uint8_t*>(workspace);
  uint8_t* body = base + l.body;
  if (!l.sampled) {
    return run_chunked(p, reinterpret_cast<float*>(body), l.fallback_rows, nullptr, stream);
  }

  SampleKeysParams sk{};
  sk.k = all.k;
  sk.k_scale = all.k_scale;
  sk.ks = all.ks;
  sk.ke = all.ke;
  sk.S = all.S;
  sk.N = all.N;
  sk.D = all.D;
  sk.k_sample = base + l.k_sample;
  sk.k_scale_sample = reinterpret_cast<float*>(base + l.k_scale_sample);
  sk.ks_sample = reinterpret_cast<int32_t*>(base + l.ks_sample);
  sk.ke_sample = reinterpret_cast<int32_t*>(base + l.ke_sample);
  sk.failed = reinterpret_cast<int32_t*>(base + l.failed);
  if (const cudaError_t e = sample_keys(sk, stream); e != cudaSuccess) return e;

  auto* thresholds_ws = reinterpret_cast<uint64_t*>(body + l.thresholds);
  auto* counts_ws = reinterpret_cast<int32_t*>(body + l.counts);
  auto* candidates_ws = reinterpret_cast<uint64_t*>(body + l.candidates);
  auto* sample_scores = reinterpret_cast<float*>(body + l.sample_scores);
  for (int64_t row0 = 0; row0 < all.S; row0 += l.rows) {
    const int64_t rows = std::min(l.rows, all.S - row0);
    const IndexerLogitsParams part = rows_of(all, row0, rows);

    IndexerLogitsParams sampled = part;
    sampled.k = sk.k_sample;
    sampled.k_scale = sk.k_scale_sample;
    sampled.N = l.ns;
    sampled.ks = sk.ks_sample + row0;
    sampled.ke = sk.ke_sample + row0;
    sampled.out = sample_scores;
    sampled.out_row_stride = l.ns;
    if (const cudaError_t e = cuda::indexer_logits(sampled, stream); e != cudaSuccess) return e;

    ThresholdParams tp{};
    tp.sample_scores = sample_scores;
    tp.Ns = l.ns;
    tp.ks = part.ks;
    tp.ke = part.ke;
    tp.ks_sample = sampled.ks;
    tp.ke_sample = sampled.ke;
    tp.R = rows;
    tp.N = all.N;
    tp.k = p.k;
    tp.thresholds = thresholds_ws;
    tp.counts = counts_ws;
    if (const cudaError_t e = thresholds(tp, stream); e != cudaSuccess) return e;

    CandidatesParams cp{};
    cp.scores = part;
    cp.thresholds = thresholds_ws;
    cp.counts = counts_ws;
    cp.candidates = candidates_ws;
    if (const cudaError_t e = candidates(cp, stream); e != cudaSuccess) return e;

    SelectParams sp{};
    sp.candidates = candidates_ws;
    sp.counts = counts_ws;
    sp.thresholds = thresholds_ws;
    sp.ks = part.ks;
    sp.ke = part.ke;
    sp.N = all.N;
    sp.R = rows;
    sp.out = p.out + row0 * p.out_row_stride;
    sp.out_row_stride = p.out_row_stride;
    sp.k = p.k;
    sp.sorted = p.sorted;
    sp.failed = sk.failed;
    if (const cudaError_t e = select(sp, stream); e != cudaSuccess) return e;
  }
  return run_chunked(p, reinterpret_cast<float*>(body), l.fallback_rows, sk.failed, stream);
}

}  // namespace indexer_topk
}  // namespace indexcache
