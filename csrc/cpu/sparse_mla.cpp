// CPU sparse MLA (absorbed form): each query attends, with every head, over the KV rows its top-k
// indices name. Prefill and decode differ only in how an index becomes a row, so both gather the
// query's rows into float and share one attention routine.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/row_kernels.h"
#include "indexcache/numeric.h"
#include "ops/backends.h"

namespace indexcache {
namespace cpu {
namespace {

void bf16_to_float_n(const uint16_t* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

void dequantize_fp8_row(const uint8_t* row, float* dst) {
  float scales[kMlaDimLatent / kMlaFp8ScaleBlock];
  std::memcpy(scales, row + kMlaFp8ScalesOffset, sizeof(scales));
  for (int i = 0; i < kMlaDimLatent; ++i)
    dst[i] = e4m3_to_float(row[i]) * scales[i / kMlaFp8ScaleBlock];
  // Cache rows start at multiples of 656 bytes, so the rope field is 2-byte aligned.
  bf16_to_float_n(reinterpret_cast<const uint16_t*>(row + kMlaFp8RopeOffset), kMlaDimRope,
                  dst + kMlaDimLatent);
}

// Per-thread buffers of one query's attention.
struct AttentionScratch {
  AttentionScratch(int topk, int d_v)
      : rows(static_cast<size_t>(topk) * kMlaDimQK), logits(topk), q(kMlaDimQK), acc(d_v) {}
  std::vector<float> rows;  // the query's valid KV rows, dequantised, duplicates included
  std::vector<float> logits;
  std::vector<float> q;     // one head of the query
  std::vector<float> acc;
};

// Softmax attention of the Hq heads of query q over the first n rows of scratch.rows.
void attend(const uint16_t* q, int Hq, int64_t n, int d_v, float sm_scale,
            AttentionScratch& scratch, uint16_t* out, float* lse) {
  for (int h = 0; h < Hq; ++h) {
    uint16_t* out_h = out + int64_t(h) * d_v;
    bf16_to_float_n(q + int64_t(h) * kMlaDimQK, kMlaDimQK, scratch.q.data());
    float max_logit = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      scratch.logits[j] =
          sm_scale * dot(scratch.q.data(), scratch.rows.data() + j * kMlaDimQK, kMlaDimQK);
      max_logit = std::max(max_logit, scratch.logits[j]);
    }
    // No row to attend to must give out = 0, lse = -inf, not the NaN of exp(-inf - -inf).
    if (max_logit == kNegInf) {
      std::fill(out_h, out_h + d_v, uint16_t(0));
      lse[h] = kNegInf;
      continue;
    }
    std::fill(scratch.acc.begin(), scratch.acc.end(), 0.0f);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float weight = std::exp(scratch.logits[j] - max_logit);
      const float* value = scratch.rows.data() + j * kMlaDimQK;
      sum += weight;
      for (int d = 0; d < d_v; ++d) scratch.acc[d] += weight * value[d];
    }
    for (int d = 0; d < d_v; ++d) out_h[d] = float_to_bf16(scratch.acc[d] / sum);
    lse[h] = max_logit + std::log(sum);
  }
}

// Attention of queries laid out [queries, Hq, 576] with indices [queries, topk] and outputs
// [queries, Hq, d_v] / [queries, Hq]. gather_row(query, index, dst) dequantises the KV row that
// `index` names for `query` into dst[0, 576), or returns false when the index is to be skipped.
template <class GatherRow>
void sparse_attention(int64_t queries, int Hq, int topk, int d_v, float sm_scale,
                      const uint16_t* q, const int32_t* indices, uint16_t* out, float* lse,
                      const GatherRow& gather_row) {
  at::parallel_for(0, queries, 1, [&](int64_t first, int64_t last) {
    AttentionScratch scratch(topk, d_v);
    for (int64_t t = first; t < last; ++t) {
      int64_t n = 0;
      for (int i = 0; i < topk; ++i) {
        if (gather_row(t, indices[t * topk + i], scratch.rows.data() + n * kMlaDimQK)) ++n;
      }
      attend(q + t * Hq * kMlaDimQK, Hq, n, d_v, sm_scale, scratch, out + t * Hq * d_v,
             lse + t * Hq);
    }
  });
}

}  // namespace

void sparse_mla_prefill(const SparseMlaPrefillParams& p) {
  sparse_attention(p.S, p.Hq, p.topk, p.d_v, p.sm_scale, p.q, p.indices, p.out, p.lse,
                   [&p](int64_t, int32_t index, float* dst) {
                     if (index < 0 || index >= p.N) return false;
                     bf16_to_float_n(p.kv + int64_t(index) * kMlaDimQK, kMlaDimQK, dst);
                     return true;
                   });
}

void sparse_mla_decode(const SparseMlaDecodeParams& p) {
  const int64_t row_bytes = p.fp8_cache ? kMlaFp8RowBytes : kMlaBf16RowBytes;
  sparse_attention(
      int64_t(p.B) * p.next_n, p.Hq, p.topk, p.d_v, p.sm_scale, p.q, p.indices, p.out, p.lse,
      [&p, row_bytes](int64_t query, int32_t position, float* dst) {
        const int32_t* pages = p.block_table + (query / p.next_n) * p.block_table_row_stride;
        const int64_t page = page_of_position(pages, p.max_pages_per_seq, p.num_pages, position);
        if (page < 0) return false;
        const uint8_t* row = p.kv_cache + (page * kPageSize + position % kPageSize) * row_bytes;
        if (p.fp8_cache) {
          dequantize_fp8_row(row, dst);
        } else {
          bf16_to_float_n(reinterpret_cast<const uint16_t*>(row), kMlaDimQK, dst);
        }
        return true;
      });
}

}  // namespace cpu
}  // namespace indexcache
