// The two back ends every op dispatches to after validation: a CPU implementation (csrc/cpu/) and
// a CUDA launcher (csrc/<family>/). Both take the same plain params struct, so the semantics live
// in one contract (params.h) and the op layer is the only code that touches tensors.
#pragma once

#include <cuda_runtime_api.h>

#include "indexcache/params.h"

namespace indexcache {

namespace cpu {
void indexer_logits(const IndexerLogitsParams& p);
void indexer_logits_paged(const IndexerLogitsPagedParams& p);
void topk(const TopkParams& p);
void indexer_topk(const IndexerTopkParams& p);
void indexer_topk_paged(const IndexerTopkPagedParams& p);
void sparse_mla_prefill(const SparseMlaPrefillParams& p);
void sparse_mla_decode(const SparseMlaDecodeParams& p);
void indexer_k_cache_insert(const IndexerKCacheInsertParams& p);
void mla_kv_cache_insert(const MlaKvCacheInsertParams& p);
}  // namespace cpu

// CUDA launchers enqueue on `stream` and return the launch status (cudaGetLastError), which the
// op layer turns into an exception; they never synchronise.
namespace cuda {
cudaError_t indexer_logits(const IndexerLogitsParams& p, cudaStream_t stream);
cudaError_t indexer_logits_paged(const IndexerLogitsPagedParams& p, cudaStream_t stream);
cudaError_t indexer_k_cache_insert(const IndexerKCacheInsertParams& p, cudaStream_t stream);
cudaError_t mla_kv_cache_insert(const MlaKvCacheInsertParams& p, cudaStream_t stream);
cudaError_t topk(const TopkParams& p, cudaStream_t stream);
cudaError_t sparse_mla_prefill(const SparseMlaPrefillParams& p, cudaStream_t stream);
cudaError_t sparse_mla_decode(const SparseMlaDecodeParams& p, cudaStream_t stream);
// Split-k scratch for `queries` query rows (prefill S, decode B * next_n) on the current device.
int64_t sparse_mla_workspace_bytes(int64_t queries, int Hq, int topk);
}  // namespace cuda

}  // namespace indexcache
