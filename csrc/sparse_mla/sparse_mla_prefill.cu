// Sparse MLA prefill launcher: q [S, Hq, 576] over a flat bf16 KV [N, 576], top-k row indices.
//
// NOTES:
// - The mainloop, its smem plan and the masking rules are in sparse_mla_sm90.cuh; this file only
//   maps the op's params onto it (one instantiation: the flat bf16 gather).
#include <cuda_runtime.h>

#include "indexcache/params.h"
#include "ops/backends.h"
#include "sparse_mla/sparse_mla_sm90.cuh"

namespace indexcache {
namespace cuda {

cudaError_t sparse_mla_prefill(const SparseMlaPrefillParams& p, cudaStream_t stream) {
  sparse_mla_sm90::Problem prob{};
  prob.q = p.q;
  prob.kv = reinterpret_cast<const uint8_t*>(p.kv);
  prob.indices = p.indices;
  prob.out = p.out;
  prob.lse = p.lse;
  prob.rows = p.S;
  prob.N = p.N;
  prob.Hq = p.Hq;
  prob.topk = p.topk;
  prob.sm_scale = p.sm_scale;
  return sparse_mla_sm90::launch<sparse_mla_sm90::Mode::kPrefill>(prob, p.workspace,
                                                                  p.workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace indexcache
