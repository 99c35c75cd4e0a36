// Standalone timing and set check of the CUDA top-k (csrc/topk/topk.cu compiled into this one
// binary, no torch): for quick A/B builds of the kernel, several per device call, where the
// extension build and the Python harness would cost minutes. Numbers for NOTES and README still
// come from `python -m bench` on committed code; this is the bench for experiments.
//
//   bash bench/topk_standalone.sh 4096x131072 1x131072 64x131072   (k = 2048; K=<k> to change)
//
// Per shape: N(0, 1) logits from a counter hash, CUDA-graph replays of 50 calls (median of 30),
// and the selected set of up to 16 spread rows compared with a host selection (value desc, then
// column asc). Exits 1 if any row differs.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "topk/topk.cu"

namespace {

#define CHECK_CUDA(x)                                                               \
  do {                                                                              \
    const cudaError_t e_ = (x);                                                     \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                \
                   cudaGetErrorString(e_));                                         \
      std::exit(2);                                                                 \
    }                                                                               \
  } while (0)

__device__ uint32_t mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

// Box-Muller over two hashes of the index: the same logits on every run and device.
__global__ void fill_normal(float* x, int64_t n, uint32_t seed) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const uint32_t a = mix(uint32_t(i) ^ seed), b = mix(uint32_t(i >> 32) ^ a ^ 0x9e3779b9u);
  const float u1 = (a >> 8) * (1.0f / 16777216.0f) + 1e-7f, u2 = (b >> 8) * (1.0f / 16777216.0f);
  x[i] = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

// Rows (of up to 16 spread ones) whose selected set differs from the host's.
int64_t wrong_rows(const float* logits, const int32_t* out, int64_t R, int64_t C, int k) {
  std::vector<float> row(C);
  std::vector<int32_t> got(k), idx(C);
  int64_t wrong = 0;
  const int64_t step = std::max<int64_t>(1, R / 16);
  for (int64_t r = 0; r < R; r += step) {
    CHECK_CUDA(cudaMemcpy(row.data(), logits + r * C, C * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(got.data(), out + r * k, k * sizeof(int32_t), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < C; ++i) idx[i] = int32_t(i);
    const int64_t n = std::min<int64_t>(k, C);
    std::nth_element(idx.begin(), idx.begin() + n - 1, idx.end(), [&](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    std::vector<int32_t> want(idx.begin(), idx.begin() + n);
    want.resize(k, -1);
    std::sort(want.begin(), want.end());
    std::sort(got.begin(), got.end());
    wrong += want != got;
  }
  return wrong;
}

}  // namespace

int main(int argc, char** argv) {
  const int k = std::getenv("K") ? std::atoi(std::getenv("K")) : 2048;
  if (k < 1 || k > indexcache::kMaxTopk) {
    std::fprintf(stderr, "K: expected 1..%d, got %d\n", indexcache::kMaxTopk, k);
    return 2;
  }
  int failed = 0;
  std::printf("%-16s %6s %12s %12s %10s\n", "rows x length", "k", "median us", "min us", "wrong");
  for (int a = 1; a < argc; ++a) {
    long long R = 0, C = 0;
    if (std::sscanf(argv[a], "%lldx%lld", &R, &C) != 2 || R <= 0 || C <= 0) {
      std::fprintf(stderr, "shape %s: expected ROWSxLENGTH, e.g. 4096x131072\n", argv[a]);
      return 2;
    }
    float* logits = nullptr;
    int32_t* out = nullptr;
    CHECK_CUDA(cudaMalloc(&logits, R * C * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&out, R * k * sizeof(int32_t)));
    fill_normal<<<unsigned((R * C + 255) / 256), 256>>>(logits, R * C, 1234u);
    CHECK_CUDA(cudaGetLastError());
    const indexcache::TopkParams p{logits, nullptr, nullptr, out, R, C, C, k, k, false};
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    for (int i = 0; i < 3; ++i) CHECK_CUDA(indexcache::cuda::topk(p, stream));
    constexpr int kCalls = 50, kReplays = 30;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < kCalls; ++i) CHECK_CUDA(indexcache::cuda::topk(p, stream));
    CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    std::vector<float> us;
    for (int i = 0; i < kReplays; ++i) {
      CHECK_CUDA(cudaEventRecord(start, stream));
      CHECK_CUDA(cudaGraphLaunch(exec, stream));
      CHECK_CUDA(cudaEventRecord(stop, stream));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
      us.push_back(ms * 1000.0f / kCalls);
    }
    std::sort(us.begin(), us.end());
    const int64_t wrong = wrong_rows(logits, out, R, C, k);
    failed |= wrong != 0;
    std::printf("%-16s %6d %12.2f %12.2f %10lld\n", argv[a], k, us[us.size() / 2], us[0],
                static_cast<long long>(wrong));
    CHECK_CUDA(cudaGraphExecDestroy(exec));
    CHECK_CUDA(cudaGraphDestroy(graph));
    CHECK_CUDA(cudaStreamDestroy(stream));
    CHECK_CUDA(cudaFree(logits));
    CHECK_CUDA(cudaFree(out));
  }
  return failed;
}
