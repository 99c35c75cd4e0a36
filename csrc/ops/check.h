// Argument checks shared by every op. Each message names the op, the argument, what was expected
// and what came, so a framework engineer can fix the call without reading this code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

namespace indexcache::ops {

class ArgCheck {
 public:
  explicit ArgCheck(const char* op) : op_(op) {}

  // dtype and rank in one go: almost every argument needs both.
  void tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim) const {
    TORCH_CHECK(t.defined(), prefix(name), "must be a tensor, got None");
    TORCH_CHECK(t.scalar_type() == dtype, prefix(name), "must have dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == dim, prefix(name), "must have ", dim, " dimensions, got ", t.dim(),
                " (shape ", t.sizes(), ")");
  }

  void size(const char* name, const at::Tensor& t, int64_t d, int64_t want,
            const char* meaning) const {
    TORCH_CHECK(t.size(d) == want, prefix(name), "dimension ", d, " must be ", meaning, " = ",
                want, ", got ", t.size(d), " (shape ", t.sizes(), ")");
  }

  void shape(const char* name, const at::Tensor& t, at::IntArrayRef want) const {
    TORCH_CHECK(t.sizes() == want, prefix(name), "must have shape ", want, ", got ", t.sizes());
  }

  // `what` names the quantity when it is a dimension of a tensor argument ("heads (dimension 1)").
  template <size_t N>
  void one_of(const char* name, const char* what, int64_t value, const int (&allowed)[N]) const {
    for (int a : allowed) {
      if (value == a) return;
    }
    std::ostringstream list;
    for (size_t i = 0; i < N; ++i) list << (i ? ", " : "") << allowed[i];
    TORCH_CHECK(false, prefix(name), what, what[0] ? " " : "", "must be one of {", list.str(),
                "}, got ", value);
  }

  // `what` names the part of the argument that is out of range ("" for the argument itself).
  void in_range(const char* name, int64_t value, int64_t lo, int64_t hi,
                const char* what = "") const {
    TORCH_CHECK(value >= lo && value <= hi, prefix(name), what, what[0] ? " " : "",
                "must be in [", lo, ", ", hi, "], got ", value);
  }

  void contiguous(const char* name, const at::Tensor& t) const {
    TORCH_CHECK(t.is_contiguous(), prefix(name), "must be contiguous, got strides ", t.strides(),
                " for shape ", t.sizes());
  }

  // Rows of contiguous elements at any row stride (padded, or 0 to broadcast one row of an input):
  // what the row-by-row kernels need. Outputs also need rows that do not overlap (output()).
  void unit_column_stride(const char* name, const at::Tensor& t) const {
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, prefix(name),
                "must have unit stride in its last dimension, got strides ", t.strides());
  }

  // The CUDA kernels move rows in 16-byte vectors (cp.async, TMA, st.v4): a view starting inside
  // an allocation must keep that alignment.
  void aligned_16(const char* name, const at::Tensor& t) const {
    TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0,
                prefix(name), "must start at a 16-byte aligned address on CUDA, got a view at ",
                t.const_data_ptr(), " (storage offset ", t.storage_offset(), ")");
  }

  void same_device(const char* name, const at::Tensor& t, const at::Tensor& ref,
                   const char* ref_name) const {
    TORCH_CHECK(t.device() == ref.device(), prefix(name), "must be on the same device as '",
                ref_name, "' (", ref.device(), "), got ", t.device());
  }

  // An input by name, for no_overlap.
  struct Named {
    const char* name;
    const at::Tensor& tensor;
  };

  // The caller-provided output must not alias any input the op reads while writing it: the
  // kernels read inputs and write outputs concurrently (rows in parallel), so an alias would give
  // wrong rows silently. Undefined (absent optional) inputs are skipped.
  void no_overlap(const char* name, const at::Tensor& out,
                  std::initializer_list<Named> inputs) const {
    TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, prefix(name),
                "must not overlap itself, got strides ", out.strides());
    for (const Named& in : inputs) {
      if (!in.tensor.defined()) continue;
      // TooHard (strided views) counts as overlap only within one storage.
      const bool shares_storage = out.numel() > 0 && in.tensor.numel() > 0 &&
                                  out.storage().is_alias_of(in.tensor.storage());
      TORCH_CHECK(!shares_storage ||
                      at::get_overlap_status(out, in.tensor) == at::MemOverlapStatus::No,
                  prefix(name), "must not overlap '", in.name, "'");
    }
  }

  // A caller-provided output: exact dtype and shape, on the inputs' device. Matrices may have
  // padded rows (the kernels take a row stride); everything else must be contiguous.
  void output(const char* name, const at::Tensor& out, at::ScalarType dtype, at::IntArrayRef shape,
              const at::Tensor& ref, const char* ref_name) const {
    tensor(name, out, dtype, static_cast<int64_t>(shape.size()));
    this->shape(name, out, shape);
    same_device(name, out, ref, ref_name);
    if (shape.size() == 2) {
      unit_column_stride(name, out);
      TORCH_CHECK(out.size(0) <= 1 || out.stride(0) >= out.size(1), prefix(name),
                  "rows must not overlap: row stride ", out.stride(0), " < row length ",
                  out.size(1));
    } else {
      contiguous(name, out);
    }
  }

  // Value checks read the data, so they run on CPU tensors only: on CUDA they would synchronise
  // the host, and the kernels clamp windows and mask bad indices instead (documented per op).
  void windows_cpu(const char* start_name, const at::Tensor& starts, const char* end_name,
                   const at::Tensor& ends, int64_t limit) const {
    if (!starts.is_cpu()) return;
    const int32_t* s = starts.data_ptr<int32_t>();
    const int32_t* e = ends.data_ptr<int32_t>();
    for (int64_t i = 0; i < starts.numel(); ++i) {
      TORCH_CHECK(s[i] >= 0 && s[i] <= e[i] && e[i] <= limit, prefix(start_name), "and '",
                  end_name, "' must satisfy 0 <= ", start_name, " <= ", end_name, " <= ", limit,
                  ", got [", s[i], ", ", e[i], ") at row ", i);
    }
  }

  std::string prefix(const char* name) const {
    return std::string("indexcache::") + op_ + ": argument '" + name + "' ";
  }

 private:
  const char* op_;
};

// An undefined `out` means: allocate it. The functional and `.out` schemas share one entry point
// per op, so validation always runs before any size is read for an allocation.
inline at::Tensor output_or_new(const at::Tensor& out, at::IntArrayRef shape, const at::Tensor& like,
                                at::ScalarType dtype) {
  return out.defined() ? out : at::empty(shape, like.options().dtype(dtype));
}

}  // namespace indexcache::ops
