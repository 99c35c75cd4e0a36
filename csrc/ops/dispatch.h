// Device dispatch shared by the op layer.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

namespace indexcache::ops {

// Runs a CUDA launcher (csrc/<family>/) on the anchor tensor's device and current stream, and
// turns its launch status into an exception. No synchronisation.
template <class Launcher>
void launch_on_device_of(const at::Tensor& anchor, Launcher&& launcher) {
  const c10::cuda::CUDAGuard guard(anchor.device());
  C10_CUDA_CHECK(launcher(at::cuda::getCurrentCUDAStream(anchor.device().index()).stream()));
}

}  // namespace indexcache::ops
