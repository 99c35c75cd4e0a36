// CPU lightning-indexer scores: I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h, :] . k[s, :])
// over each row's window, -inf elsewhere. Products of e4m3 values are exact in float, so with the
// fixed summation order of dot() the scores are reproducible bit for bit.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu/row_kernels.h"
#include "indexcache/numeric.h"
#include "ops/backends.h"

namespace indexcache {
namespace cpu {
namespace {

void decode_e4m3(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = e4m3_to_float(src[i]);
}

// Score of one key against a query whose H heads are already decoded; `k` receives the key.
float score_key(const float* q, const float* weights, int H, int D, const uint8_t* key,
                float key_scale, float* k) {
  decode_e4m3(key, D, k);
  float sum = 0.0f;
  for (int h = 0; h < H; ++h)
    sum += weights[h] * std::max(dot(q + int64_t(h) * D, k, D), 0.0f);
  return sum * key_scale;
}

// Decodes query row r (H heads of D e4m3 values) into scratch.q.
void decode_query(const uint8_t* q, int64_t r, int H, int D, IndexerRowScratch& scratch) {
  const int64_t elems = int64_t(H) * D;
  decode_e4m3(q + r * elems, elems, scratch.q.data());
}

// Scores every output row and fills the rest of each row with -inf.
template <class Params>
void write_logits(const Params& p, int64_t rows, int64_t row_len, ScoreRowFn<Params> score_row) {
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    IndexerRowScratch scratch(p.H, p.D);
    for (int64_t r = first; r < last; ++r) {
      float* row = p.out + r * p.out_row_stride;
      const Window window = score_row(p, r, row, scratch);
      std::fill(row, row + window.begin, kNegInf);
      std::fill(row + window.end, row + row_len, kNegInf);
    }
  });
}

}  // namespace

Window score_indexer_row(const IndexerLogitsParams& p, int64_t t, float* row,
                         IndexerRowScratch& scratch) {
  const Window window = clamp_window(p.ks[t], p.ke[t], p.N);
  decode_query(p.q, t, p.H, p.D, scratch);
  const float* weights = p.weights + t * p.H;
  for (int64_t s = window.begin; s < window.end; ++s)
    row[s] = score_key(scratch.q.data(), weights, p.H, p.D, p.k + s * p.D, p.k_scale[s],
                       scratch.k.data());
  return window;
}

Window score_indexer_paged_row(const IndexerLogitsPagedParams& p, int64_t r, float* row,
                               IndexerRowScratch& scratch) {
  const int64_t b = r / p.next_n;
  const int64_t j = r % p.next_n;
  const Window window =
      clamp_window(0, int64_t(p.context_lens[b]) - p.next_n + j + 1, p.max_context_len);
  decode_query(p.q, r, p.H, p.D, scratch);
  const float* weights = p.weights + r * p.H;
  const int32_t* pages = p.block_table + b * p.block_table_row_stride;
  const IndexerCacheLayout layout{p.D};
  for (int64_t pos = window.begin; pos < window.end; ++pos) {
    const int64_t page = page_of_position(pages, p.max_pages_per_seq, p.num_pages, pos);
    if (page < 0) {
      row[pos] = kNegInf;
      continue;
    }
    const int64_t in_page = pos % kPageSize;
    float key_scale;
    std::memcpy(&key_scale, p.kv_cache + layout.scale_offset(page, in_page), sizeof(key_scale));
    row[pos] = score_key(scratch.q.data(), weights, p.H, p.D,
                         p.kv_cache + layout.key_offset(page, in_page), key_scale,
                         scratch.k.data());
  }
  return window;
}

void indexer_logits(const IndexerLogitsParams& p) {
  write_logits(p, p.S, p.N, &score_indexer_row);
}

void indexer_logits_paged(const IndexerLogitsPagedParams& p) {
  write_logits(p, int64_t(p.B) * p.next_n, p.max_context_len, &score_indexer_paged_row);
}

}  // namespace cpu
}  // namespace indexcache
