// Op layer of index-gathered sparse MLA attention (absorbed / MQA form), prefill and paged decode.
// Indices are validated on the CPU only: reading device data would synchronise, so the CUDA
// kernels mask out-of-range indices and block-table entries instead (csrc/sparse_mla/).
#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>
#include <utility>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "ops/check.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace indexcache::ops {
namespace {

void check_scalars(const ArgCheck& c, double sm_scale, int64_t d_v) {
  // The kernels take it as a float (flushing subnormals): a double that becomes 0 or inf there
  // would turn the softmax into NaN.
  TORCH_CHECK(sm_scale >= std::numeric_limits<float>::min() &&
                  sm_scale <= std::numeric_limits<float>::max(),
              c.prefix("sm_scale"), "must be a positive normal float (in [",
              std::numeric_limits<float>::min(), ", ", std::numeric_limits<float>::max(),
              "]), got ", sm_scale);
  TORCH_CHECK(d_v == kMlaDimLatent, c.prefix("d_v"), "must be ", kMlaDimLatent,
              " (the latent rows are V), got ", d_v);
}

// Both outputs at once: they are written together and share the leading shape of q.
std::pair<at::Tensor, at::Tensor> outputs(const ArgCheck& c, const at::Tensor& q,
                                          const at::Tensor& out_arg, const at::Tensor& lse_arg,
                                          std::initializer_list<ArgCheck::Named> inputs) {
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = kMlaDimLatent;
  const std::vector<int64_t> lse_shape(out_shape.begin(), out_shape.end() - 1);
  const at::Tensor out = output_or_new(out_arg, out_shape, q, at::kBFloat16);
  const at::Tensor lse = output_or_new(lse_arg, lse_shape, q, at::kFloat);
  c.output("out", out, at::kBFloat16, out_shape, q, "q");
  c.output("lse", lse, at::kFloat, lse_shape, q, "q");
  c.contiguous("lse", lse);
  c.no_overlap("out", out, inputs);
  c.no_overlap("lse", lse, inputs);
  c.no_overlap("lse", lse, {{"out", out}});
  return {out, lse};
}

template <class Params>
void set_outputs(Params& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = static_cast<uint16_t*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
}

// Runs a CUDA launcher with its split-k scratch (cuda::sparse_mla_workspace_bytes, a function of
// the shapes and the device only) allocated through the caching allocator on q's device and
// current stream: no cudaMalloc, no host synchronisation, capturable in a CUDA graph.
template <class Params, class Launcher>
void launch_with_workspace(const at::Tensor& q, int64_t queries, Params& p, Launcher&& launcher) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t bytes = cuda::sparse_mla_workspace_bytes(queries, p.Hq, p.topk);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({bytes}, q.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = bytes;
  }
  launch_on_device_of(q, [&](cudaStream_t s) { return launcher(p, s); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_mla_prefill(const at::Tensor& q, const at::Tensor& kv,
                                                      const at::Tensor& indices, double sm_scale,
                                                      int64_t d_v, const at::Tensor& out_arg,
                                                      const at::Tensor& lse_arg) {
  const ArgCheck c("sparse_mla_prefill");
  c.tensor("q", q, at::kBFloat16, 3);
  c.tensor("kv", kv, at::kBFloat16, 3);
  c.tensor("indices", indices, at::kInt, 2);
  const int64_t S = q.size(0), Hq = q.size(1), N = kv.size(0), topk = indices.size(1);
  c.one_of("q", "heads (dimension 1)", Hq, kMlaHeads);
  c.size("q", q, 2, kMlaDimQK, "the MLA query dim 512 + 64");
  c.size("kv", kv, 1, 1, "one KV head");
  c.size("kv", kv, 2, kMlaDimQK, "the MLA row dim 512 + 64");
  c.size("indices", indices, 0, S, "number of queries S of q");
  TORCH_CHECK(topk >= 1, c.prefix("indices"), "must hold at least one index per query, got ",
              topk);
  TORCH_CHECK(N <= INT32_MAX, c.prefix("kv"), "must have at most 2^31 - 1 rows, got ", N);
  check_scalars(c, sm_scale, d_v);
  for (const auto& [name, t] : {std::pair{"kv", &kv}, {"indices", &indices}}) {
    c.same_device(name, *t, q, "q");
  }
  for (const auto& [name, t] : {std::pair{"q", &q}, {"kv", &kv}, {"indices", &indices}}) {
    c.contiguous(name, *t);
  }
  if (q.is_cpu()) {
    const int32_t* idx = indices.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < indices.numel(); ++i) {
      TORCH_CHECK(idx[i] >= -1 && idx[i] < N, c.prefix("indices"), "must be -1 or in [0, ", N,
                  "), got ", idx[i], " at [", i / topk, ", ", i % topk, "]");
    }
  }
  const auto [out, lse] =
      outputs(c, q, out_arg, lse_arg, {{"q", q}, {"kv", kv}, {"indices", indices}});

  SparseMlaPrefillParams p{};
  p.q = static_cast<const uint16_t*>(q.const_data_ptr());
  p.kv = static_cast<const uint16_t*>(kv.const_data_ptr());
  p.indices = indices.const_data_ptr<int32_t>();
  set_outputs(p, out, lse);
  p.S = S;
  p.N = N;
  p.Hq = static_cast<int>(Hq);
  p.topk = static_cast<int>(topk);
  p.d_v = static_cast<int>(d_v);
  p.sm_scale = static_cast<float>(sm_scale);
  if (q.is_cuda()) {
    for (const auto& [name, t] : {std::pair{"q", &q}, {"kv", &kv}, {"out", &out}}) {
      c.aligned_16(name, *t);
    }
    launch_with_workspace(q, S, p, [](const SparseMlaPrefillParams& params, cudaStream_t s) {
      return cuda::sparse_mla_prefill(params, s);
    });
  } else {
    cpu::sparse_mla_prefill(p);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_decode(const at::Tensor& q,
                                                     const at::Tensor& kv_cache,
                                                     const at::Tensor& indices,
                                                     const at::Tensor& block_table,
                                                     double sm_scale, int64_t d_v,
                                                     const at::Tensor& out_arg,
                                                     const at::Tensor& lse_arg) {
  const ArgCheck c("sparse_mla_decode");
  c.tensor("q", q, at::kBFloat16, 4);
  const bool fp8_cache = kv_cache.defined() && kv_cache.scalar_type() == at::kByte;
  c.tensor("kv_cache", kv_cache, fp8_cache ? at::kByte : at::kBFloat16, 4);
  c.tensor("indices", indices, at::kInt, 3);
  c.tensor("block_table", block_table, at::kInt, 2);
  const int64_t B = q.size(0), next_n = q.size(1), Hq = q.size(2), topk = indices.size(2);
  c.in_range("q", next_n, 1, kMaxNextN, "next_n (dimension 1)");
  c.one_of("q", "heads (dimension 2)", Hq, kMlaHeads);
  c.size("q", q, 3, kMlaDimQK, "the MLA query dim 512 + 64");
  c.size("kv_cache", kv_cache, 1, kPageSize, "page size");
  c.size("kv_cache", kv_cache, 2, 1, "one KV head");
  c.size("kv_cache", kv_cache, 3, fp8_cache ? kMlaFp8RowBytes : kMlaDimQK,
         fp8_cache ? "the FP8 row bytes (512 e4m3 + 4 fp32 scales + 64 bf16 rope)"
                   : "the bf16 row dim 512 + 64");
  c.size("indices", indices, 0, B, "batch B of q");
  c.size("indices", indices, 1, next_n, "next_n of q");
  TORCH_CHECK(topk >= 1, c.prefix("indices"), "must hold at least one index per query, got ",
              topk);
  c.size("block_table", block_table, 0, B, "batch B of q");
  check_scalars(c, sm_scale, d_v);
  for (const auto& [name, t] : {std::pair{"kv_cache", &kv_cache}, {"indices", &indices},
                                {"block_table", &block_table}}) {
    c.same_device(name, *t, q, "q");
  }
  for (const auto& [name, t] : {std::pair{"q", &q}, {"kv_cache", &kv_cache},
                                {"indices", &indices}}) {
    c.contiguous(name, *t);
  }
  c.unit_column_stride("block_table", block_table);
  const int64_t num_pages = kv_cache.size(0), max_pages = block_table.size(1);
  if (q.is_cpu()) {
    const int32_t* idx = indices.const_data_ptr<int32_t>();
    const int64_t per_batch = next_n * topk;
    for (int64_t i = 0; i < indices.numel(); ++i) {
      const int64_t b = i / per_batch;
      TORCH_CHECK(idx[i] >= -1 && idx[i] < max_pages * kPageSize, c.prefix("indices"),
                  "must be -1 or a position in [0, block_table.size(1) * 64 = ",
                  max_pages * kPageSize, "), got ", idx[i], " at batch ", b);
      if (idx[i] < 0) continue;
      const int32_t page =
          block_table.const_data_ptr<int32_t>()[b * block_table.stride(0) + idx[i] / kPageSize];
      TORCH_CHECK(page >= 0 && page < num_pages, c.prefix("block_table"),
                  "entries referenced by 'indices' must be page ids in [0, ", num_pages,
                  "), got ", page, " at [", b, ", ", idx[i] / kPageSize, "]");
    }
  }
  const auto [out, lse] =
      outputs(c, q, out_arg, lse_arg,
              {{"q", q}, {"kv_cache", kv_cache}, {"indices", indices},
               {"block_table", block_table}});

  SparseMlaDecodeParams p{};
  p.q = static_cast<const uint16_t*>(q.const_data_ptr());
  p.kv_cache = static_cast<const uint8_t*>(kv_cache.const_data_ptr());
  p.fp8_cache = fp8_cache;
  p.indices = indices.const_data_ptr<int32_t>();
  p.block_table = block_table.const_data_ptr<int32_t>();
  set_outputs(p, out, lse);
  p.B = static_cast<int>(B);
  p.next_n = static_cast<int>(next_n);
  p.Hq = static_cast<int>(Hq);
  p.topk = static_cast<int>(topk);
  p.d_v = static_cast<int>(d_v);
  p.num_pages = num_pages;
  p.max_pages_per_seq = static_cast<int>(max_pages);
  p.block_table_row_stride = block_table.stride(0);
  p.sm_scale = static_cast<float>(sm_scale);
  if (q.is_cuda()) {
    for (const auto& [name, t] : {std::pair{"q", &q}, {"kv_cache", &kv_cache}, {"out", &out}}) {
      c.aligned_16(name, *t);
    }
    launch_with_workspace(q, B * next_n, p,
                          [](const SparseMlaDecodeParams& params, cudaStream_t s) {
                            return cuda::sparse_mla_decode(params, s);
                          });
  } else {
    cpu::sparse_mla_decode(p);
  }
  return {out, lse};
}

}  // namespace indexcache::ops
