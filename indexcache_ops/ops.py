"""Typed wrappers of the ``torch.ops.indexcache`` ops and their fake implementations.

Every op exists twice in the schema: a functional form that allocates its outputs, and an
``.out`` overload that writes caller-provided buffers (persistent buffers are what CUDA graphs
need). The wrappers here pick the overload from ``out=``. Validation happens in C++ (one check per
op, shared by the CPU and CUDA paths); errors are ``RuntimeError`` naming the argument.

Conventions: index tensors are ``int32``; fp8 tensors are ``torch.float8_e4m3fn``; paged caches
are ``uint8`` views of 64-token pages. On CUDA no op synchronises the host: windows are clamped
to ``[0, N]`` and out-of-range indices are masked instead of raising, which the CPU path does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.indexcache

MLA_DIM_LATENT = 512
MLA_DIM_QK = 576
PAGE_SIZE = 64  # tokens per page of every paged cache (DeepGEMM's and FlashMLA's layout)


def indexer_logits(
    q: Tensor, k: Tensor, k_scale: Tensor, weights: Tensor, ks: Tensor, ke: Tensor,
    *, out: Optional[Tensor] = None,
) -> Tensor:
    """Lightning-indexer scores of every query against its window of keys.

    ``I[t, s] = k_scale[s] * sum_h weights[t, h] * relu(q[t, h, :] . k[s, :])`` for
    ``ks[t] <= s < ke[t]``, ``-inf`` elsewhere.

    Args:
        q: ``[S, H, D]`` float8_e4m3fn, H in {32, 64}, D in {64, 128}.
        k: ``[N, D]`` float8_e4m3fn.
        k_scale: ``[N]`` float32, one dequantisation scale per key.
        weights: ``[S, H]`` float32 with the q scale and ``H^-1/2 D^-1/2`` folded in
            (:func:`indexcache_ops.quant.fold_indexer_weights`).
        ks, ke: ``[S]`` int32 window ``[ks, ke)`` per query, ``0 <= ks <= ke <= N``.
        out: optional ``[S, N]`` float32 with unit column stride (the row stride may be padded).
    Returns:
        ``[S, N]`` float32 (``out`` when given).
    """
    if out is None:
        return _ops.indexer_logits(q, k, k_scale, weights, ks, ke)
    _ops.indexer_logits.out(q, k, k_scale, weights, ks, ke, out=out)
    return out


def indexer_logits_paged(
    q: Tensor, kv_cache: Tensor, weights: Tensor, context_lens: Tensor, block_table: Tensor,
    max_context_len: int, *, out: Optional[Tensor] = None,
) -> Tensor:
    """Decode form of :func:`indexer_logits` over the paged FP8 indexer cache.

    Args:
        q: ``[B, next_n, H, D]`` float8_e4m3fn, next_n in 1..4 (MTP rows).
        kv_cache: ``[pages, 64, 1, D + 4]`` uint8 in DeepGEMM's layout: per page 64 rows of D
            e4m3 bytes, then 64 float32 scales.
        weights: ``[B * next_n, H]`` float32 (folded, as for :func:`indexer_logits`).
        context_lens: ``[B]`` int32, tokens of each sequence including the ``next_n`` new ones.
        block_table: ``[B, max_pages]`` int32 page ids; entries past a sequence's length are
            never read.
        max_context_len: columns of the output.
        out: optional ``[B * next_n, max_context_len]`` float32.
    Returns:
        ``[B * next_n, max_context_len]`` float32; row ``b * next_n + j`` holds scores for positions
        ``[0, context_lens[b] - next_n + j + 1)`` and ``-inf`` after them.
    """
    if out is None:
        return _ops.indexer_logits_paged(q, kv_cache, weights, context_lens, block_table,
                                         max_context_len)
    _ops.indexer_logits_paged.out(q, kv_cache, weights, context_lens, block_table,
                                  max_context_len, out=out)
    return out


def topk(
    logits: Tensor, k: int, row_starts: Optional[Tensor] = None,
    row_ends: Optional[Tensor] = None, *, sorted: bool = False, out: Optional[Tensor] = None,
) -> Tensor:
    """The ``k`` largest entries of each row window, as absolute column indices.

    Order is NaN < -inf < ... < +inf; ties go to the smaller column, so the selected set is a
    pure function of the input. Rows whose window holds fewer than ``k`` columns return all of
    them, padded with -1. The order within a row is unspecified unless ``sorted`` (descending
    value, then ascending index).

    Args:
        logits: ``[R, C]`` float32, unit column stride, any row stride.
        k: 1..2048.
        row_starts, row_ends: optional ``[R]`` int32 windows ``[start, end)`` (both or neither;
            default: the whole row).
        out: optional ``[R, k]`` int32.
    Returns:
        ``[R, k]`` int32.
    """
    if out is None:
        return _ops.topk(logits, k, row_starts, row_ends, sorted)
    _ops.topk.out(logits, k, row_starts, row_ends, sorted, out=out)
    return out


def indexer_topk(
    q: Tensor, k: Tensor, k_scale: Tensor, weights: Tensor, ks: Tensor, ke: Tensor, topk: int,
    *, sorted: bool = False, out: Optional[Tensor] = None,
) -> Tensor:
    """``topk(indexer_logits(...), topk, ks, ke)`` without materialising the ``[S, N]`` scores.

    Arguments as :func:`indexer_logits`, plus ``topk`` (1..2048) and ``sorted``.
    Returns ``[S, topk]`` int32 key indices, -1 padded.

    Unsorted rows come in ascending key order, sorted ones in (score desc, key asc) order.

    Extra memory: on the CPU one row of scores per thread. On CUDA one workspace of at most
    128 MiB plus ``N / 32 * (D + 4) + 8 * S`` bytes, whatever S and N are. Large calls
    (``S * N >= 2**26`` and ``N * H >= 2**21``) score every 32nd key first, take from those
    scores a threshold per query that keeps ~3.6 K of its keys (k = 2048), and score every key
    keeping only those at or above it (the top k is then selected among them): no ``[S, N]``.
    A row whose sample misleads is detected exactly (too few or too many keys kept) and the call
    then re-runs the bounded-chunk route on the device (about twice the time, same result).
    Smaller calls take that route directly: ``floor(128 MiB / 4N)`` rows of scores at a time,
    selected chunk by chunk on the stream. ``INDEXCACHE_INDEXER_TOPK=chunked`` or ``=sampled``
    in the environment forces a route.
    """
    if out is None:
        return _ops.indexer_topk(q, k, k_scale, weights, ks, ke, topk, sorted)
    _ops.indexer_topk.out(q, k, k_scale, weights, ks, ke, topk, sorted, out=out)
    return out


def indexer_topk_paged(
    q: Tensor, kv_cache: Tensor, weights: Tensor, context_lens: Tensor, block_table: Tensor,
    max_context_len: int, topk: int, *, sorted: bool = False, out: Optional[Tensor] = None,
) -> Tensor:
    """Decode form of :func:`indexer_topk` over the paged indexer cache.

    Arguments as :func:`indexer_logits_paged`, plus ``topk`` and ``sorted``.
    Returns ``[B * next_n, topk]`` int32 positions, -1 padded.
    """
    if out is None:
        return _ops.indexer_topk_paged(q, kv_cache, weights, context_lens, block_table,
                                       max_context_len, topk, sorted)
    _ops.indexer_topk_paged.out(q, kv_cache, weights, context_lens, block_table,
                                max_context_len, topk, sorted, out=out)
    return out


def _allocate_attention_outputs(op: str, out: Optional[Tensor], lse: Optional[Tensor]) -> bool:
    """True when the op should allocate; a lone ``out`` or ``lse`` is refused, since the kernel
    writes both."""
    if (out is None) != (lse is None):
        given, missing = ("out", "lse") if lse is None else ("lse", "out")
        raise RuntimeError(f"indexcache::{op}: argument '{missing}' must be given together with "
                           f"'{given}' (both or neither)")
    return out is None


def sparse_mla_prefill(
    q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int = MLA_DIM_LATENT,
    *, out: Optional[Tensor] = None, lse: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sparse MLA attention (absorbed / MQA form) over the selected keys of each query.

    ``out[t, h] = sum_j softmax_j(sm_scale * q[t, h] . kv[i_j]) * kv[i_j, :512]`` over the
    indices ``i_j`` of query t; -1 is skipped and duplicates count twice.

    Args:
        q: ``[S, Hq, 576]`` bfloat16, Hq in {16, 32, 64, 128}.
        kv: ``[N, 1, 576]`` bfloat16; the first 512 dims are also V.
        indices: ``[S, k]`` int32, -1 or in ``[0, N)``.
        sm_scale: softmax scale.
        d_v: 512.
        out, lse: optional ``[S, Hq, 512]`` bfloat16 and ``[S, Hq]`` float32 (both or neither).
    Returns:
        ``(out, lse)``; lse is the natural log of the softmax denominator. A query with no valid
        index gets ``out = 0`` and ``lse = -inf``.
    """
    if _allocate_attention_outputs("sparse_mla_prefill", out, lse):
        return _ops.sparse_mla_prefill(q, kv, indices, sm_scale, d_v)
    _ops.sparse_mla_prefill.out(q, kv, indices, sm_scale, d_v, out=out, lse=lse)
    return out, lse


def sparse_mla_decode(
    q: Tensor, kv_cache: Tensor, indices: Tensor, block_table: Tensor, sm_scale: float,
    d_v: int = MLA_DIM_LATENT, *, out: Optional[Tensor] = None, lse: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sparse MLA attention over a paged cache, for ``next_n`` new tokens per sequence.

    Args:
        q: ``[B, next_n, Hq, 576]`` bfloat16.
        kv_cache: bfloat16 ``[pages, 64, 1, 576]``, or uint8 ``[pages, 64, 1, 656]`` FP8 rows
            (512 e4m3 | 4 float32 scales, one per 128 values | 64 bfloat16 rope).
        indices: ``[B, next_n, k]`` int32 positions in the sequence, -1 to skip; position p of
            batch b is row ``p % 64`` of page ``block_table[b, p // 64]``.
        block_table: ``[B, max_pages]`` int32.
        sm_scale, d_v: as :func:`sparse_mla_prefill`.
        out, lse: optional ``[B, next_n, Hq, 512]`` bfloat16 and ``[B, next_n, Hq]`` float32.
    Returns:
        ``(out, lse)`` as :func:`sparse_mla_prefill`.
    """
    if _allocate_attention_outputs("sparse_mla_decode", out, lse):
        return _ops.sparse_mla_decode(q, kv_cache, indices, block_table, sm_scale, d_v)
    _ops.sparse_mla_decode.out(q, kv_cache, indices, block_table, sm_scale, d_v, out=out, lse=lse)
    return out, lse


def indexer_k_quant_and_cache(
    k: Tensor, kv_cache: Tensor, slot_mapping: Tensor, *, pow2_scale: bool = True,
) -> None:
    """Quantise indexer keys to e4m3 and write them into the paged indexer cache in place.

    Args:
        k: ``[T, D]`` bfloat16 (already Hadamard-rotated).
        kv_cache: ``[pages, 64, 1, D + 4]`` uint8 (layout of :func:`indexer_logits_paged`).
        slot_mapping: ``[T]`` int64, ``page * 64 + row``; negative slots are skipped. Two
            tokens with one slot leave that row undefined (they are written concurrently).
        pow2_scale: round each token's scale ``amax / 448`` up to a power of two, as
            DeepSeek-V3.2 does.
    """
    _ops.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, pow2_scale)


def mla_kv_cache_insert(
    kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
    *, pow2_scale: bool = False,
) -> None:
    """Write MLA latent rows into the paged MLA cache in place (bf16 rows, or FP8 656-byte rows).

    Args:
        kv_c: ``[T, 512]`` bfloat16 latent; k_pe: ``[T, 64]`` bfloat16 rope part.
        kv_cache: bfloat16 ``[pages, 64, 1, 576]`` or uint8 ``[pages, 64, 1, 656]``.
        slot_mapping: ``[T]`` int64, ``page * 64 + row``; negative slots are skipped. Two
            tokens with one slot leave that row undefined (they are written concurrently).
        pow2_scale: FP8 only: round each 128-value scale ``amax / 448`` up to a power of two.
    """
    _ops.mla_kv_cache_insert(kv_c, k_pe, kv_cache, slot_mapping, pow2_scale)


# ---- fake implementations: output metadata only, for torch.compile and FakeTensor tracing ----

def _float32(like: Tensor, *shape) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _int32(like: Tensor, *shape) -> Tensor:
    return like.new_empty(shape, dtype=torch.int32)


def _attention_outputs(q: Tensor) -> Tuple[Tensor, Tensor]:
    lead = q.shape[:-1]
    return q.new_empty((*lead, MLA_DIM_LATENT), dtype=torch.bfloat16), _float32(q, *lead)


def _writes_only(*args, **kwargs) -> None:
    return None


_register_fake = torch.library.register_fake
_register_fake("indexcache::indexer_logits")(
    lambda q, k, k_scale, weights, ks, ke: _float32(q, q.shape[0], k.shape[0]))
_register_fake("indexcache::indexer_logits_paged")(
    lambda q, kv_cache, weights, context_lens, block_table, max_context_len:
    _float32(q, q.shape[0] * q.shape[1], max_context_len))
_register_fake("indexcache::topk")(
    lambda logits, k, row_starts=None, row_ends=None, sorted=False:
    _int32(logits, logits.shape[0], k))
_register_fake("indexcache::indexer_topk")(
    lambda q, k, k_scale, weights, ks, ke, topk, sorted=False: _int32(q, q.shape[0], topk))
_register_fake("indexcache::indexer_topk_paged")(
    lambda q, kv_cache, weights, context_lens, block_table, max_context_len, topk, sorted=False:
    _int32(q, q.shape[0] * q.shape[1], topk))
_register_fake("indexcache::sparse_mla_prefill")(
    lambda q, kv, indices, sm_scale, d_v=MLA_DIM_LATENT: _attention_outputs(q))
_register_fake("indexcache::sparse_mla_decode")(
    lambda q, kv_cache, indices, block_table, sm_scale, d_v=MLA_DIM_LATENT:
    _attention_outputs(q))
for _name in ("indexer_logits.out", "indexer_logits_paged.out", "topk.out", "indexer_topk.out",
              "indexer_topk_paged.out", "sparse_mla_prefill.out", "sparse_mla_decode.out",
              "indexer_k_quant_and_cache", "mla_kv_cache_insert"):
    _register_fake(f"indexcache::{_name}")(_writes_only)
