// Op layer of the cache writers: quantise-and-insert into the paged indexer cache and the paged
// MLA cache (bf16 or FP8 rows). slot_mapping is int64 as in vLLM and SGLang, so a framework
// passes its own tensor without a cast kernel per layer.
#include <ATen/ATen.h>

#include <utility>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "ops/check.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace indexcache::ops {
namespace {

void check_slots(const ArgCheck& c, const at::Tensor& slot_mapping, int64_t tokens,
                 const at::Tensor& ref, const char* ref_name, int64_t num_pages) {
  c.tensor("slot_mapping", slot_mapping, at::kLong, 1);
  c.size("slot_mapping", slot_mapping, 0, tokens, "number of tokens");
  c.same_device("slot_mapping", slot_mapping, ref, ref_name);
  c.contiguous("slot_mapping", slot_mapping);
  if (!slot_mapping.is_cpu()) return;
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] < num_pages * kPageSize, c.prefix("slot_mapping"),
                "must be negative (skip) or a slot in [0, pages * 64 = ", num_pages * kPageSize,
                "), got ", slots[t], " at token ", t);
  }
}

}  // namespace

void indexer_k_quant_and_cache(const at::Tensor& k, const at::Tensor& kv_cache,
                               const at::Tensor& slot_mapping, bool pow2_scale) {
  const ArgCheck c("indexer_k_quant_and_cache");
  c.tensor("k", k, at::kBFloat16, 2);
  c.tensor("kv_cache", kv_cache, at::kByte, 4);
  const int64_t T = k.size(0), D = k.size(1);
  c.one_of("k", "head dim (dimension 1)", D, kIndexerHeadDims);
  c.size("kv_cache", kv_cache, 1, kPageSize, "page size");
  c.size("kv_cache", kv_cache, 2, 1, "one KV head");
  c.size("kv_cache", kv_cache, 3, D + 4, "D + 4 bytes per token (D e4m3 + one fp32 scale)");
  c.same_device("kv_cache", kv_cache, k, "k");
  c.contiguous("k", k);
  c.contiguous("kv_cache", kv_cache);
  check_slots(c, slot_mapping, T, k, "k", kv_cache.size(0));
  c.no_overlap("kv_cache", kv_cache, {{"k", k}, {"slot_mapping", slot_mapping}});

  IndexerKCacheInsertParams p{};
  p.k = static_cast<const uint16_t*>(k.const_data_ptr());
  p.slot_mapping = slot_mapping.const_data_ptr<int64_t>();
  p.kv_cache = kv_cache.data_ptr<uint8_t>();
  p.T = T;
  p.D = static_cast<int>(D);
  p.num_pages = kv_cache.size(0);
  p.pow2_scale = pow2_scale;
  if (k.is_cuda()) {
    c.aligned_16("kv_cache", kv_cache);
    launch_on_device_of(k, [&](cudaStream_t s) { return cuda::indexer_k_cache_insert(p, s); });
  } else {
    cpu::indexer_k_cache_insert(p);
  }
}

void mla_kv_cache_insert(const at::Tensor& kv_c, const at::Tensor& k_pe,
                         const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                         bool pow2_scale) {
  const ArgCheck c("mla_kv_cache_insert");
  c.tensor("kv_c", kv_c, at::kBFloat16, 2);
  c.tensor("k_pe", k_pe, at::kBFloat16, 2);
  const bool fp8_cache = kv_cache.defined() && kv_cache.scalar_type() == at::kByte;
  c.tensor("kv_cache", kv_cache, fp8_cache ? at::kByte : at::kBFloat16, 4);
  const int64_t T = kv_c.size(0);
  c.size("kv_c", kv_c, 1, kMlaDimLatent, "the latent dim");
  c.shape("k_pe", k_pe, {T, kMlaDimRope});
  c.size("kv_cache", kv_cache, 1, kPageSize, "page size");
  c.size("kv_cache", kv_cache, 2, 1, "one KV head");
  c.size("kv_cache", kv_cache, 3, fp8_cache ? kMlaFp8RowBytes : kMlaDimQK,
         fp8_cache ? "the FP8 row bytes (512 e4m3 + 4 fp32 scales + 64 bf16 rope)"
                   : "the bf16 row dim 512 + 64");
  for (const auto& [name, t] : {std::pair{"k_pe", &k_pe}, {"kv_cache", &kv_cache}}) {
    c.same_device(name, *t, kv_c, "kv_c");
  }
  c.unit_column_stride("kv_c", kv_c);
  c.unit_column_stride("k_pe", k_pe);
  c.contiguous("kv_cache", kv_cache);
  check_slots(c, slot_mapping, T, kv_c, "kv_c", kv_cache.size(0));
  c.no_overlap("kv_cache", kv_cache,
               {{"kv_c", kv_c}, {"k_pe", k_pe}, {"slot_mapping", slot_mapping}});

  MlaKvCacheInsertParams p{};
  p.kv_c = static_cast<const uint16_t*>(kv_c.const_data_ptr());
  p.k_pe = static_cast<const uint16_t*>(k_pe.const_data_ptr());
  p.slot_mapping = slot_mapping.const_data_ptr<int64_t>();
  p.kv_cache = static_cast<uint8_t*>(kv_cache.data_ptr());
  p.fp8_cache = fp8_cache;
  p.T = T;
  p.kv_c_row_stride = kv_c.stride(0);
  p.k_pe_row_stride = k_pe.stride(0);
  p.num_pages = kv_cache.size(0);
  p.pow2_scale = pow2_scale;
  if (kv_c.is_cuda()) {
    c.aligned_16("kv_cache", kv_cache);
    launch_on_device_of(kv_c, [&](cudaStream_t s) { return cuda::mla_kv_cache_insert(p, s); });
  } else {
    cpu::mla_kv_cache_insert(p);
  }
}

}  // namespace indexcache::ops
