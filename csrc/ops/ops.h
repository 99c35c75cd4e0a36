// Entry points of every op, one per op family member. Each validates its arguments once (the same
// checks for CPU and CUDA), builds the plain params struct and dispatches on the tensors' device.
// `out` (and `lse`) may be undefined: then the op allocates them. ops.cpp registers each entry
// point under both schemas, the functional one and `.out`.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace indexcache::ops {

at::Tensor indexer_logits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                          const at::Tensor& weights, const at::Tensor& ks, const at::Tensor& ke,
                          const at::Tensor& out);

at::Tensor indexer_logits_paged(const at::Tensor& q, const at::Tensor& kv_cache,
                                const at::Tensor& weights, const at::Tensor& context_lens,
                                const at::Tensor& block_table, int64_t max_context_len,
                                const at::Tensor& out);

at::Tensor topk(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& row_starts,
                const std::optional<at::Tensor>& row_ends, bool sorted, const at::Tensor& out);

at::Tensor indexer_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                        const at::Tensor& weights, const at::Tensor& ks, const at::Tensor& ke,
                        int64_t topk, bool sorted, const at::Tensor& out);

at::Tensor indexer_topk_paged(const at::Tensor& q, const at::Tensor& kv_cache,
                              const at::Tensor& weights, const at::Tensor& context_lens,
                              const at::Tensor& block_table, int64_t max_context_len,
                              int64_t topk, bool sorted, const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> sparse_mla_prefill(const at::Tensor& q, const at::Tensor& kv,
                                                      const at::Tensor& indices, double sm_scale,
                                                      int64_t d_v, const at::Tensor& out,
                                                      const at::Tensor& lse);

std::tuple<at::Tensor, at::Tensor> sparse_mla_decode(const at::Tensor& q,
                                                     const at::Tensor& kv_cache,
                                                     const at::Tensor& indices,
                                                     const at::Tensor& block_table,
                                                     double sm_scale, int64_t d_v,
                                                     const at::Tensor& out, const at::Tensor& lse);

void indexer_k_quant_and_cache(const at::Tensor& k, const at::Tensor& kv_cache,
                               const at::Tensor& slot_mapping, bool pow2_scale);

void mla_kv_cache_insert(const at::Tensor& kv_c, const at::Tensor& k_pe,
                         const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                         bool pow2_scale);

}  // namespace indexcache::ops
