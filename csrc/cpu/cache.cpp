// CPU writers of the paged caches: the indexer K cache (e4m3 + one scale per token) and the MLA
// cache (bf16 rows copied, or FP8 rows quantised per 128 values).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/row_kernels.h"
#include "indexcache/numeric.h"
#include "ops/backends.h"

namespace indexcache {
namespace cpu {
namespace {

// Quantises n bf16 values with one shared scale (amax / 448) into dst and returns the scale.
float quantize_e4m3_block(const uint16_t* src, int n, bool pow2_scale, uint8_t* dst) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(bf16_to_float(src[i])));
  const float scale = e4m3_quant_scale(amax, pow2_scale);
  for (int i = 0; i < n; ++i) dst[i] = float_to_e4m3(bf16_to_float(src[i]) / scale);
  return scale;
}

// Calls write_token(t, page, row) for every token whose slot names a row of the cache; negative
// slots are skips by contract, slots past the cache are dropped rather than written out of bounds.
template <class WriteToken>
void insert_tokens(int64_t T, const int64_t* slot_mapping, int64_t num_pages,
                   const WriteToken& write_token) {
  at::parallel_for(0, T, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0 || slot >= num_pages * kPageSize) continue;
      write_token(t, slot / kPageSize, slot % kPageSize);
    }
  });
}

}  // namespace

void indexer_k_cache_insert(const IndexerKCacheInsertParams& p) {
  const IndexerCacheLayout layout{p.D};
  insert_tokens(p.T, p.slot_mapping, p.num_pages, [&](int64_t t, int64_t page, int64_t row) {
    const float scale = quantize_e4m3_block(p.k + t * p.D, p.D, p.pow2_scale,
                                            p.kv_cache + layout.key_offset(page, row));
    std::memcpy(p.kv_cache + layout.scale_offset(page, row), &scale, sizeof(scale));
  });
}

void mla_kv_cache_insert(const MlaKvCacheInsertParams& p) {
  const int64_t row_bytes = p.fp8_cache ? kMlaFp8RowBytes : kMlaBf16RowBytes;
  insert_tokens(p.T, p.slot_mapping, p.num_pages, [&](int64_t t, int64_t page, int64_t row) {
    uint8_t* dst = p.kv_cache + (page * kPageSize + row) * row_bytes;
    const uint16_t* latent = p.kv_c + t * p.kv_c_row_stride;
    const uint16_t* rope = p.k_pe + t * p.k_pe_row_stride;
    if (!p.fp8_cache) {
      std::memcpy(dst, latent, kMlaDimLatent * sizeof(uint16_t));
      std::memcpy(dst + kMlaDimLatent * sizeof(uint16_t), rope, kMlaDimRope * sizeof(uint16_t));
      return;
    }
    for (int block = 0; block < kMlaDimLatent / kMlaFp8ScaleBlock; ++block) {
      const int first = block * kMlaFp8ScaleBlock;
      const float scale =
          quantize_e4m3_block(latent + first, kMlaFp8ScaleBlock, p.pow2_scale, dst + first);
      std::memcpy(dst + kMlaFp8ScalesOffset + block * sizeof(float), &scale, sizeof(scale));
    }
    std::memcpy(dst + kMlaFp8RopeOffset, rope, kMlaDimRope * sizeof(uint16_t));
  });
}

}  // namespace cpu
}  // namespace indexcache
