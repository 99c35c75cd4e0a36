// The one place that defines and registers every op of the `indexcache` namespace.
//
// NOTES:
// - Each op has a functional schema that allocates its outputs and an `.out` overload that writes
//   caller-provided buffers (persistent, CUDA-graph safe). `.out` returns nothing: functionalisation
//   in torch.compile rejects custom ops whose outputs alias their inputs.
// - The same entry point serves CPU and CUDA tensors; it validates once and dispatches on the
//   device itself, so both back ends see identical checks. Fake (meta) implementations for
//   torch.compile live in indexcache_ops/ops.py.
#include <torch/library.h>

#include "ops/ops.h"

namespace indexcache::ops {

namespace {
const at::Tensor kAllocate;  // undefined: the entry point allocates the output
}  // namespace

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

void register_impls(torch::Library& m) {
  m.impl("indexer_logits", [](const Tensor& q, const Tensor& k, const Tensor& k_scale,
                              const Tensor& w, const Tensor& ks, const Tensor& ke) {
    return indexer_logits(q, k, k_scale, w, ks, ke, kAllocate);
  });
  m.impl("indexer_logits.out", [](const Tensor& q, const Tensor& k, const Tensor& k_scale,
                                  const Tensor& w, const Tensor& ks, const Tensor& ke,
                                  const Tensor& out) {
    indexer_logits(q, k, k_scale, w, ks, ke, out);
  });
  m.impl("indexer_logits_paged", [](const Tensor& q, const Tensor& cache, const Tensor& w,
                                    const Tensor& lens, const Tensor& table, int64_t max_len) {
    return indexer_logits_paged(q, cache, w, lens, table, max_len, kAllocate);
  });
  m.impl("indexer_logits_paged.out", [](const Tensor& q, const Tensor& cache, const Tensor& w,
                                        const Tensor& lens, const Tensor& table, int64_t max_len,
                                        const Tensor& out) {
    indexer_logits_paged(q, cache, w, lens, table, max_len, out);
  });
  m.impl("topk", [](const Tensor& logits, int64_t k, const OptTensor& starts,
                    const OptTensor& ends, bool sorted) {
    return topk(logits, k, starts, ends, sorted, kAllocate);
  });
  m.impl("topk.out", [](const Tensor& logits, int64_t k, const OptTensor& starts,
                        const OptTensor& ends, bool sorted, const Tensor& out) {
    topk(logits, k, starts, ends, sorted, out);
  });
  m.impl("indexer_topk", [](const Tensor& q, const Tensor& k, const Tensor& k_scale,
                            const Tensor& w, const Tensor& ks, const Tensor& ke, int64_t n,
                            bool sorted) {
    return indexer_topk(q, k, k_scale, w, ks, ke, n, sorted, kAllocate);
  });
  m.impl("indexer_topk.out", [](const Tensor& q, const Tensor& k, const Tensor& k_scale,
                                const Tensor& w, const Tensor& ks, const Tensor& ke, int64_t n,
                                bool sorted, const Tensor& out) {
    indexer_topk(q, k, k_scale, w, ks, ke, n, sorted, out);
  });
  m.impl("indexer_topk_paged", [](const Tensor& q, const Tensor& cache, const Tensor& w,
                                  const Tensor& lens, const Tensor& table, int64_t max_len,
                                  int64_t n, bool sorted) {
    return indexer_topk_paged(q, cache, w, lens, table, max_len, n, sorted, kAllocate);
  });
  m.impl("indexer_topk_paged.out", [](const Tensor& q, const Tensor& cache, const Tensor& w,
                                      const Tensor& lens, const Tensor& table, int64_t max_len,
                                      int64_t n, bool sorted, const Tensor& out) {
    indexer_topk_paged(q, cache, w, lens, table, max_len, n, sorted, out);
  });
  m.impl("sparse_mla_prefill", [](const Tensor& q, const Tensor& kv, const Tensor& idx,
                                  double scale, int64_t d_v) {
    return sparse_mla_prefill(q, kv, idx, scale, d_v, kAllocate, kAllocate);
  });
  m.impl("sparse_mla_prefill.out", [](const Tensor& q, const Tensor& kv, const Tensor& idx,
                                      double scale, int64_t d_v, const Tensor& out,
                                      const Tensor& lse) {
    sparse_mla_prefill(q, kv, idx, scale, d_v, out, lse);
  });
  m.impl("sparse_mla_decode", [](const Tensor& q, const Tensor& cache, const Tensor& idx,
                                 const Tensor& table, double scale, int64_t d_v) {
    return sparse_mla_decode(q, cache, idx, table, scale, d_v, kAllocate, kAllocate);
  });
  m.impl("sparse_mla_decode.out", [](const Tensor& q, const Tensor& cache, const Tensor& idx,
                                     const Tensor& table, double scale, int64_t d_v,
                                     const Tensor& out, const Tensor& lse) {
    sparse_mla_decode(q, cache, idx, table, scale, d_v, out, lse);
  });
  m.impl("indexer_k_quant_and_cache", &indexer_k_quant_and_cache);
  m.impl("mla_kv_cache_insert", &mla_kv_cache_insert);
}

}  // namespace indexcache::ops

#define INDEXCACHE_INDEXER_ARGS "Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor ks, Tensor ke"
#define INDEXCACHE_PAGED_ARGS \
  "Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, Tensor block_table, int max_context_len"

TORCH_LIBRARY(indexcache, m) {
  m.def("indexer_logits(" INDEXCACHE_INDEXER_ARGS ") -> Tensor");
  m.def("indexer_logits.out(" INDEXCACHE_INDEXER_ARGS ", *, Tensor(a!) out) -> ()");
  m.def("indexer_logits_paged(" INDEXCACHE_PAGED_ARGS ") -> Tensor");
  m.def("indexer_logits_paged.out(" INDEXCACHE_PAGED_ARGS ", *, Tensor(a!) out) -> ()");
  m.def("topk(Tensor logits, int k, Tensor? row_starts=None, Tensor? row_ends=None, "
        "bool sorted=False) -> Tensor");
  m.def("topk.out(Tensor logits, int k, Tensor? row_starts=None, Tensor? row_ends=None, "
        "bool sorted=False, *, Tensor(a!) out) -> ()");
  m.def("indexer_topk(" INDEXCACHE_INDEXER_ARGS ", int topk, bool sorted=False) -> Tensor");
  m.def("indexer_topk.out(" INDEXCACHE_INDEXER_ARGS
        ", int topk, bool sorted=False, *, Tensor(a!) out) -> ()");
  m.def("indexer_topk_paged(" INDEXCACHE_PAGED_ARGS ", int topk, bool sorted=False) -> Tensor");
  m.def("indexer_topk_paged.out(" INDEXCACHE_PAGED_ARGS
        ", int topk, bool sorted=False, *, Tensor(a!) out) -> ()");
  m.def("sparse_mla_prefill(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v=512) "
        "-> (Tensor, Tensor)");
  m.def("sparse_mla_prefill.out(Tensor q, Tensor kv, Tensor indices, float sm_scale, "
        "int d_v=512, *, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def("sparse_mla_decode(Tensor q, Tensor kv_cache, Tensor indices, Tensor block_table, "
        "float sm_scale, int d_v=512) -> (Tensor, Tensor)");
  m.def("sparse_mla_decode.out(Tensor q, Tensor kv_cache, Tensor indices, Tensor block_table, "
        "float sm_scale, int d_v=512, *, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def("indexer_k_quant_and_cache(Tensor k, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "bool pow2_scale=True) -> ()");
  m.def("mla_kv_cache_insert(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, "
        "Tensor slot_mapping, bool pow2_scale=False) -> ()");
}

TORCH_LIBRARY_IMPL(indexcache, CPU, m) { indexcache::ops::register_impls(m); }
TORCH_LIBRARY_IMPL(indexcache, CUDA, m) { indexcache::ops::register_impls(m); }
