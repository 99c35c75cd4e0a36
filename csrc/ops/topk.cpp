// Op layer of top-k over row windows of a materialised logits matrix.
#include <ATen/ATen.h>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "ops/check.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace indexcache::ops {

at::Tensor topk(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& row_starts,
                const std::optional<at::Tensor>& row_ends, bool sorted, const at::Tensor& out_arg) {
  const ArgCheck c("topk");
  c.tensor("logits", logits, at::kFloat, 2);
  c.unit_column_stride("logits", logits);
  c.in_range("k", k, 1, kMaxTopk);
  const int64_t R = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C <= INT32_MAX, c.prefix("logits"), "must have at most 2^31 - 1 columns, got ", C);
  TORCH_CHECK(row_starts.has_value() == row_ends.has_value(), c.prefix("row_starts"),
              "and 'row_ends' must be given together or not at all");
  if (row_starts.has_value()) {
    for (const auto& [name, t] : {std::pair{"row_starts", &*row_starts}, {"row_ends", &*row_ends}}) {
      c.tensor(name, *t, at::kInt, 1);
      c.size(name, *t, 0, R, "number of rows of logits");
      c.same_device(name, *t, logits, "logits");
      c.contiguous(name, *t);
    }
    c.windows_cpu("row_starts", *row_starts, "row_ends", *row_ends, C);
  }
  const at::Tensor out = output_or_new(out_arg, {R, k}, logits, at::kInt);
  c.output("out", out, at::kInt, {R, k}, logits, "logits");
  c.no_overlap("out", out, {{"logits", logits}, {"row_starts", row_starts.value_or(at::Tensor())},
                            {"row_ends", row_ends.value_or(at::Tensor())}});

  TopkParams p{};
  p.logits = logits.const_data_ptr<float>();
  p.row_starts = row_starts ? row_starts->const_data_ptr<int32_t>() : nullptr;
  p.row_ends = row_ends ? row_ends->const_data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr<int32_t>();
  p.R = R;
  p.C = C;
  p.logits_row_stride = logits.stride(0);
  p.out_row_stride = out.stride(0);
  p.k = static_cast<int>(k);
  p.sorted = sorted;
  if (logits.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logits.device());
    launch_on_device_of(logits, [&](cudaStream_t s) { return cuda::topk(p, s); });
  } else {
    cpu::topk(p);
  }
  return out;
}

}  // namespace indexcache::ops
