// The CUDA ragged (prefill) indexer_topk as the op layer calls it: the route, the workspace it
// needs, and the launches. Torch-free; design in pipeline.cu's NOTES.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "indexcache/params.h"

namespace indexcache {
namespace indexer_topk {

// kAuto picks by shape (pipeline.cu); the others force a route (tests, benchmarks).
enum class Route { kAuto, kChunked, kSampled };

// Bytes of device workspace run() needs for p: at most ~128 MiB plus N / 32 x (D + 4) + 8 S.
int64_t workspace_bytes(const IndexerTopkParams& p, Route route);

// Enqueues the op on `stream` with `workspace` (256-byte aligned, workspace_bytes(p, route)
// bytes, contents irrelevant); never synchronises.
cudaError_t run(const IndexerTopkParams& p, Route route, void* workspace, cudaStream_t stream);

}  // namespace indexer_topk
}  // namespace indexcache
