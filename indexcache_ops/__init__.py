"""indexcache-ops: Hopper kernels and the per-layer index-reuse API for DeepSeek Sparse Attention.

Importing the package loads the compiled extension, which registers every op under
``torch.ops.indexcache``; :mod:`indexcache_ops.ops` holds the typed wrappers and the fake
implementations that ``torch.compile`` uses.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C
from . import ops
from .ops import (
    indexer_k_quant_and_cache,
    indexer_logits,
    indexer_logits_paged,
    indexer_topk,
    indexer_topk_paged,
    mla_kv_cache_insert,
    sparse_mla_decode,
    sparse_mla_prefill,
    topk,
)
from .reuse import PAGE_SIZE, IndexCache, IndexCacheConfig
from .version import __version__


def build_info() -> dict:
    """What was compiled: version, git sha, CUDA and CUTLASS versions, CUDA architectures."""
    return dict(_C.build_info())


__all__ = [
    "PAGE_SIZE",
    "IndexCache",
    "IndexCacheConfig",
    "__version__",
    "build_info",
    "indexer_k_quant_and_cache",
    "indexer_logits",
    "indexer_logits_paged",
    "indexer_topk",
    "indexer_topk_paged",
    "mla_kv_cache_insert",
    "ops",
    "sparse_mla_decode",
    "sparse_mla_prefill",
    "topk",
]
