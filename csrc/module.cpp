// indexcache_ops._C: loading it registers every op (ops.cpp's static registrars); the module
// itself only reports what was built, so a bug report can say exactly which binary ran.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cutlass/version.h>

#include <string>

#ifndef INDEXCACHE_VERSION
#error "INDEXCACHE_VERSION must be defined by the build (CMakeLists.txt reads indexcache_ops/version.py)"
#endif
#ifndef INDEXCACHE_GIT_SHA
#define INDEXCACHE_GIT_SHA "unknown"
#endif
#ifndef INDEXCACHE_CUDA_ARCHS
#error "INDEXCACHE_CUDA_ARCHS must be defined by the build"
#endif

namespace py = pybind11;

namespace {

std::string cuda_version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "indexcache-ops compiled extension: op registration and build information";
  m.def("build_info", [] {
    py::dict info;
    info["version"] = INDEXCACHE_VERSION;
    info["git_sha"] = INDEXCACHE_GIT_SHA;
    info["cuda_version"] = cuda_version_string(CUDART_VERSION);
    info["cutlass_version"] = std::to_string(CUTLASS_MAJOR) + "." +
                              std::to_string(CUTLASS_MINOR) + "." +
                              std::to_string(CUTLASS_PATCH);
    info["cuda_archs"] = INDEXCACHE_CUDA_ARCHS;
    return info;
  }, "Version, git commit, CUDA and CUTLASS versions and CUDA architectures of this build.");
}
