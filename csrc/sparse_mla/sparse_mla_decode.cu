// Sparse MLA decode launcher: q [B, next_n, Hq, 576] over a paged bf16 or FP8 (656-byte) cache.
//
// NOTES:
// - A decode query (b, j) is a prefill query row b * next_n + j with its own top-k positions; the
//   gather maps position -> block_table[b, pos / 64] -> cache row, masking positions past the
//   table and pages outside the cache on the device (no host validation, graph-capturable).
// - FP8 rows are dequantised to bf16 in smem (e4m3 * fp32 scale rounded to bf16), so both caches
//   share the bf16 wgmma mainloop of sparse_mla_sm90.cuh.
#include <cuda_runtime.h>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "sparse_mla/sparse_mla_sm90.cuh"

namespace indexcache {
namespace cuda {

cudaError_t sparse_mla_decode(const SparseMlaDecodeParams& p, cudaStream_t stream) {
  sparse_mla_sm90::Problem prob{};
  prob.q = p.q;
  prob.kv = p.kv_cache;
  prob.indices = p.indices;
  prob.block_table = p.block_table;
  prob.out = p.out;
  prob.lse = p.lse;
  prob.rows = int64_t(p.B) * p.next_n;
  prob.num_pages = p.num_pages;
  prob.block_table_row_stride = p.block_table_row_stride;
  prob.max_pages_per_seq = p.max_pages_per_seq;
  prob.next_n = p.next_n;
  prob.Hq = p.Hq;
  prob.topk = p.topk;
  prob.sm_scale = p.sm_scale;
  using sparse_mla_sm90::Mode;
  using sparse_mla_sm90::launch;
  return p.fp8_cache ? launch<Mode::kDecodeFp8>(prob, p.workspace, p.workspace_bytes, stream)
                     : launch<Mode::kDecodeBf16>(prob, p.workspace, p.workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace indexcache
