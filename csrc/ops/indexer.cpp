// Op layer of the indexer family: indexer_logits, indexer_logits_paged and their fused top-k forms.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <utility>

#include "indexcache/params.h"
#include "indexer_topk/pipeline.h"
#include "ops/backends.h"
#include "ops/check.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace indexcache::ops {
namespace {

IndexerLogitsParams ragged_params(const ArgCheck& c, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& k_scale, const at::Tensor& weights,
                                  const at::Tensor& ks, const at::Tensor& ke) {
  c.tensor("q", q, at::kFloat8_e4m3fn, 3);
  c.tensor("k", k, at::kFloat8_e4m3fn, 2);
  c.tensor("k_scale", k_scale, at::kFloat, 1);
  c.tensor("weights", weights, at::kFloat, 2);
  c.tensor("ks", ks, at::kInt, 1);
  c.tensor("ke", ke, at::kInt, 1);
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), N = k.size(0);
  c.one_of("q", "heads (dimension 1)", H, kIndexerHeads);
  c.one_of("q", "head dim (dimension 2)", D, kIndexerHeadDims);
  c.size("k", k, 1, D, "head dim D of q");
  c.size("k_scale", k_scale, 0, N, "number of keys N of k");
  c.shape("weights", weights, {S, H});
  c.size("ks", ks, 0, S, "number of queries S of q");
  c.size("ke", ke, 0, S, "number of queries S of q");
  TORCH_CHECK(N <= INT32_MAX, c.prefix("k"), "must have at most 2^31 - 1 keys, got ", N);
  for (const auto& [name, t] : {std::pair{"k", &k}, {"k_scale", &k_scale}, {"weights", &weights},
                                {"ks", &ks}, {"ke", &ke}}) {
    c.same_device(name, *t, q, "q");
  }
  for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"k_scale", &k_scale},
                                {"weights", &weights}, {"ks", &ks}, {"ke", &ke}}) {
    c.contiguous(name, *t);
  }
  c.windows_cpu("ks", ks, "ke", ke, N);

  IndexerLogitsParams p{};
  p.q = static_cast<const uint8_t*>(q.const_data_ptr());
  p.k = static_cast<const uint8_t*>(k.const_data_ptr());
  p.k_scale = k_scale.const_data_ptr<float>();
  p.weights = weights.const_data_ptr<float>();
  p.ks = ks.const_data_ptr<int32_t>();
  p.ke = ke.const_data_ptr<int32_t>();
  p.S = S;
  p.N = N;
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  return p;
}

IndexerLogitsPagedParams paged_params(const ArgCheck& c, const at::Tensor& q,
                                      const at::Tensor& kv_cache, const at::Tensor& weights,
                                      const at::Tensor& context_lens,
                                      const at::Tensor& block_table, int64_t max_context_len) {
  c.tensor("q", q, at::kFloat8_e4m3fn, 4);
  c.tensor("kv_cache", kv_cache, at::kByte, 4);
  c.tensor("weights", weights, at::kFloat, 2);
  c.tensor("context_lens", context_lens, at::kInt, 1);
  c.tensor("block_table", block_table, at::kInt, 2);
  const int64_t B = q.size(0), next_n = q.size(1), H = q.size(2), D = q.size(3);
  c.in_range("q", next_n, 1, kMaxNextN, "next_n (dimension 1)");
  c.one_of("q", "heads (dimension 2)", H, kIndexerHeads);
  c.one_of("q", "head dim (dimension 3)", D, kIndexerHeadDims);
  c.size("kv_cache", kv_cache, 1, kPageSize, "page size");
  c.size("kv_cache", kv_cache, 2, 1, "one KV head");
  c.size("kv_cache", kv_cache, 3, D + 4, "D + 4 bytes per token (D e4m3 + one fp32 scale)");
  c.shape("weights", weights, {B * next_n, H});
  c.size("context_lens", context_lens, 0, B, "batch B of q");
  c.size("block_table", block_table, 0, B, "batch B of q");
  c.in_range("max_context_len", max_context_len, 0, INT32_MAX);
  for (const auto& [name, t] : {std::pair{"kv_cache", &kv_cache}, {"weights", &weights},
                                {"context_lens", &context_lens}, {"block_table", &block_table}}) {
    c.same_device(name, *t, q, "q");
  }
  for (const auto& [name, t] : {std::pair{"q", &q}, {"kv_cache", &kv_cache},
                                {"weights", &weights}, {"context_lens", &context_lens}}) {
    c.contiguous(name, *t);
  }
  c.unit_column_stride("block_table", block_table);
  const int64_t num_pages = kv_cache.size(0), max_pages = block_table.size(1);
  if (q.is_cpu()) {
    const int64_t len_limit = std::min(max_context_len, max_pages * kPageSize);
    const int32_t* lens = context_lens.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(lens[b] >= 0 && lens[b] <= len_limit, c.prefix("context_lens"),
                  "must be in [0, min(max_context_len, block_table.size(1) * 64)] = [0, ",
                  len_limit, "], got ", lens[b], " at batch ", b);
      const int32_t* row = block_table.const_data_ptr<int32_t>() + b * block_table.stride(0);
      for (int64_t page = 0; page * kPageSize < lens[b]; ++page) {
        TORCH_CHECK(row[page] >= 0 && row[page] < num_pages, c.prefix("block_table"),
                    "entries in use must be page ids in [0, ", num_pages, "), got ", row[page],
                    " at [", b, ", ", page, "]");
      }
    }
  }

  IndexerLogitsPagedParams p{};
  p.q = static_cast<const uint8_t*>(q.const_data_ptr());
  p.kv_cache = kv_cache.const_data_ptr<uint8_t>();
  p.weights = weights.const_data_ptr<float>();
  p.context_lens = context_lens.const_data_ptr<int32_t>();
  p.block_table = block_table.const_data_ptr<int32_t>();
  p.B = static_cast<int>(B);
  p.next_n = static_cast<int>(next_n);
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.num_pages = num_pages;
  p.max_pages_per_seq = static_cast<int>(max_pages);
  p.block_table_row_stride = block_table.stride(0);
  p.max_context_len = static_cast<int>(max_context_len);
  return p;
}

// The CUDA kernels read q and the keys with TMA, which needs 16-byte aligned base addresses and
// 32-bit row coordinates. Contiguous tensors from the caching allocator always qualify; a view
// with an odd storage offset does not.
void check_tma_operand(const ArgCheck& c, const char* name, const at::Tensor& t, int64_t rows) {
  c.aligned_16(name, t);
  TORCH_CHECK(rows <= INT32_MAX, c.prefix(name),
              "must have at most 2^31 - 1 rows of D values on CUDA, got ", rows);
}

// NOTES:
// - The ragged CUDA form runs csrc/indexer_topk/pipeline.cu (its route, workspace and launches);
//   INDEXCACHE_INDEXER_TOPK=chunked or =sampled forces a route (tests and benchmarks), unset or
//   anything else lets the pipeline pick by shape.
// - The paged (decode) form scores a chunk of rows into a workspace of at most
//   indexer_topk::kScoreWorkspaceBytes and selects on it with the radix top-k, chunk after chunk
//   on the stream: memory bounded whatever the context length (one row per chunk at least).

indexer_topk::Route requested_route() {
  const char* v = std::getenv("INDEXCACHE_INDEXER_TOPK");
  const std::string_view route = v != nullptr ? v : "";
  if (route == "chunked") return indexer_topk::Route::kChunked;
  if (route == "sampled") return indexer_topk::Route::kSampled;
  return indexer_topk::Route::kAuto;
}

int64_t rows_per_chunk(int64_t row_len) {
  return std::max<int64_t>(1, indexer_topk::kScoreWorkspaceBytes /
                                  (int64_t{sizeof(float)} * std::max<int64_t>(row_len, 1)));
}

void chunked_indexer_topk_paged_cuda(const IndexerTopkPagedParams& p, const at::Tensor& q,
                                     const at::Tensor& context_lens) {
  const IndexerLogitsPagedParams& all = p.scores;
  const int64_t len = all.max_context_len, n = all.next_n;
  const int64_t batches = indexer_topk::balanced_chunk(all.B, rows_per_chunk(len) / n);
  const at::Tensor scores = at::empty({batches * n, len}, q.options().dtype(at::kFloat));
  // Row (b, j) sees [0, len_b - next_n + j + 1): its end bounds the selection, so positions past
  // it (scored -inf) are never selected in place of -1 padding. Lengths past the block table
  // (rejected on the CPU) are cut at its last page the same way. Three small kernels per call;
  // int64 arithmetic would add two conversions for lengths no valid call has.
  const int64_t table_positions = int64_t{all.max_pages_per_seq} * kPageSize;
  const at::Tensor row_ends =
      (context_lens.unsqueeze(1) + at::arange(1 - n, 1, context_lens.options()))
          .clamp(0, std::min(len, table_positions))
          .to(at::kInt)
          .contiguous();
  launch_on_device_of(q, [&](cudaStream_t stream) {
    for (int64_t b0 = 0; b0 < all.B; b0 += batches) {
      IndexerLogitsPagedParams part = all;
      part.q += b0 * n * all.H * all.D;
      part.weights += b0 * n * all.H;
      part.context_lens += b0;
      part.block_table += b0 * all.block_table_row_stride;
      part.B = static_cast<int>(std::min<int64_t>(batches, all.B - b0));
      part.out = scores.data_ptr<float>();
      part.out_row_stride = len;
      if (const cudaError_t e = cuda::indexer_logits_paged(part, stream); e != cudaSuccess) {
        return e;
      }
      const TopkParams t = indexer_topk::topk_over_scores(
          part.out, part.B * n, len, nullptr, row_ends.const_data_ptr<int32_t>() + b0 * n,
          p.out + b0 * n * p.out_row_stride, p.out_row_stride, p.k, p.sorted);
      if (const cudaError_t e = cuda::topk(t, stream); e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

}  // namespace

at::Tensor indexer_logits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                              const at::Tensor& weights, const at::Tensor& ks,
                              const at::Tensor& ke, const at::Tensor& out_arg) {
  const ArgCheck c("indexer_logits");
  IndexerLogitsParams p = ragged_params(c, q, k, k_scale, weights, ks, ke);
  const at::Tensor out = output_or_new(out_arg, {p.S, p.N}, q, at::kFloat);
  c.output("out", out, at::kFloat, {p.S, p.N}, q, "q");
  c.no_overlap("out", out, {{"q", q}, {"k", k}, {"k_scale", k_scale}, {"weights", weights},
                            {"ks", ks}, {"ke", ke}});
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  if (q.is_cuda()) {
    check_tma_operand(c, "q", q, p.S * p.H);
    check_tma_operand(c, "k", k, p.N);
    launch_on_device_of(q, [&](cudaStream_t s) { return cuda::indexer_logits(p, s); });
  } else {
    cpu::indexer_logits(p);
  }
  return out;
}

at::Tensor indexer_logits_paged(const at::Tensor& q, const at::Tensor& kv_cache,
                                    const at::Tensor& weights, const at::Tensor& context_lens,
                                    const at::Tensor& block_table, int64_t max_context_len,
                                    const at::Tensor& out_arg) {
  const ArgCheck c("indexer_logits_paged");
  IndexerLogitsPagedParams p =
      paged_params(c, q, kv_cache, weights, context_lens, block_table, max_context_len);
  const int64_t rows = int64_t{p.B} * p.next_n;
  const at::Tensor out = output_or_new(out_arg, {rows, max_context_len}, q, at::kFloat);
  c.output("out", out, at::kFloat, {rows, max_context_len}, q, "q");
  c.no_overlap("out", out, {{"q", q}, {"kv_cache", kv_cache}, {"weights", weights},
                            {"context_lens", context_lens}, {"block_table", block_table}});
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  if (q.is_cuda()) {
    check_tma_operand(c, "q", q, rows * p.H);
    check_tma_operand(c, "kv_cache", kv_cache, p.num_pages);
    launch_on_device_of(q, [&](cudaStream_t s) { return cuda::indexer_logits_paged(p, s); });
  } else {
    cpu::indexer_logits_paged(p);
  }
  return out;
}

at::Tensor indexer_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                            const at::Tensor& weights, const at::Tensor& ks, const at::Tensor& ke,
                            int64_t topk, bool sorted, const at::Tensor& out_arg) {
  const ArgCheck c("indexer_topk");
  IndexerTopkParams p{};
  p.scores = ragged_params(c, q, k, k_scale, weights, ks, ke);
  c.in_range("topk", topk, 1, kMaxTopk);
  const at::Tensor out = output_or_new(out_arg, {p.scores.S, topk}, q, at::kInt);
  c.output("out", out, at::kInt, {p.scores.S, topk}, q, "q");
  c.no_overlap("out", out, {{"q", q}, {"k", k}, {"k_scale", k_scale}, {"weights", weights},
                            {"ks", ks}, {"ke", ke}});
  p.out = out.data_ptr<int32_t>();
  p.out_row_stride = out.stride(0);
  p.k = static_cast<int>(topk);
  p.sorted = sorted;
  if (q.is_cuda()) {
    check_tma_operand(c, "q", q, p.scores.S * p.scores.H);
    check_tma_operand(c, "k", k, p.scores.N);
    const indexer_topk::Route route = requested_route();
    const at::Tensor workspace =
        at::empty({indexer_topk::workspace_bytes(p, route)}, q.options().dtype(at::kByte));
    launch_on_device_of(q, [&](cudaStream_t s) {
      return indexer_topk::run(p, route, workspace.data_ptr(), s);
    });
  } else {
    cpu::indexer_topk(p);
  }
  return out;
}

at::Tensor indexer_topk_paged(const at::Tensor& q, const at::Tensor& kv_cache,
                                  const at::Tensor& weights, const at::Tensor& context_lens,
                                  const at::Tensor& block_table, int64_t max_context_len,
                                  int64_t topk, bool sorted, const at::Tensor& out_arg) {
  const ArgCheck c("indexer_topk_paged");
  IndexerTopkPagedParams p{};
  p.scores = paged_params(c, q, kv_cache, weights, context_lens, block_table, max_context_len);
  c.in_range("topk", topk, 1, kMaxTopk);
  const int64_t rows = int64_t{p.scores.B} * p.scores.next_n;
  const at::Tensor out = output_or_new(out_arg, {rows, topk}, q, at::kInt);
  c.output("out", out, at::kInt, {rows, topk}, q, "q");
  c.no_overlap("out", out, {{"q", q}, {"kv_cache", kv_cache}, {"weights", weights},
                            {"context_lens", context_lens}, {"block_table", block_table}});
  p.out = out.data_ptr<int32_t>();
  p.out_row_stride = out.stride(0);
  p.k = static_cast<int>(topk);
  p.sorted = sorted;
  if (q.is_cuda()) {
    check_tma_operand(c, "q", q, rows * p.scores.H);
    check_tma_operand(c, "kv_cache", kv_cache, p.scores.num_pages);
    chunked_indexer_topk_paged_cuda(p, q, context_lens);
  } else {
    cpu::indexer_topk_paged(p);
  }
  return out;
}

}  // namespace indexcache::ops
