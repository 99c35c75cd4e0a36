"""Float64 brute-force references of every op in :mod:`indexcache_ops.ops`.

They exist to test the kernels, so they share no code with them (nor with
:mod:`indexcache_ops.quant`): paged byte layouts are decoded here with numpy structured dtypes,
e4m3 is encoded by nearest-value search over the 256 codes, and top-k is a stable lexicographic
sort. Inputs may live on any device; every result is a CPU tensor. Scores, attention outputs and
log-sum-exps are float64, indices int32. The two cache writers are functional: they return an
updated copy of the cache instead of writing in place.

Conventions shared with the ops (see DESIGN.md §2-3 and csrc/include/indexcache/params.h):

- e4m3 values are decoded exactly (every e4m3 value is a float64).
- Top-k order: NaN < -inf < ... < +inf, equal values (including -0.0 == +0.0 and all NaNs) go to
  the smaller index. Results are always in sorted order (descending value, ascending index),
  -1 padded at the end.
- Quantisation scale of a block: ``max(amax, 1e-4) / 448`` in float32 (the 1e-4 floor keeps an
  all-zero block from dividing by zero, as DeepSeek-V3.2 and vLLM do), optionally rounded up to
  the next power of two.
"""

from __future__ import annotations

import numpy as np
import torch

PAGE_SIZE = 64
MLA_LATENT = 512
MLA_ROPE = 64
MLA_DIM = MLA_LATENT + MLA_ROPE
MLA_FP8_BLOCK = 128
MLA_FP8_ROW_BYTES = MLA_LATENT + (MLA_LATENT // MLA_FP8_BLOCK) * 4 + MLA_ROPE * 2
E4M3_MAX = 448.0
SCALE_AMAX_FLOOR = np.float32(1e-4)

_MLA_FP8_ROW = np.dtype(
    [("nope", "u1", (MLA_LATENT,)), ("scale", "<f4", (MLA_LATENT // MLA_FP8_BLOCK,)),
     ("rope", "<u2", (MLA_ROPE,))]
)
assert _MLA_FP8_ROW.itemsize == MLA_FP8_ROW_BYTES


def _indexer_page_dtype(d: int) -> np.dtype:
    return np.dtype([("k", "u1", (PAGE_SIZE, d)), ("scale", "<f4", (PAGE_SIZE,))])


# ----------------------------------------------------------------------------------------------
# conversions


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.float8_e4m3fn:
            t = t.view(torch.uint8)
        elif t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
            return t.numpy().view(np.uint16)
        return t.numpy()
    return np.asarray(t)


def _f64(t) -> np.ndarray:
    """A tensor of float8_e4m3fn / bfloat16 / float32 / float64 values -> float64 numpy."""
    if isinstance(t, torch.Tensor) and t.dtype == torch.float8_e4m3fn:
        return e4m3_decode(_np(t))
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
        return bf16_decode(_np(t))
    return _np(t).astype(np.float64)


def e4m3_decode(codes) -> np.ndarray:
    """uint8 e4m3 codes (any shape, numpy or torch uint8/float8) -> float64 values."""
    t = torch.as_tensor(np.ascontiguousarray(_np(codes)).view(np.uint8))
    return t.view(torch.float8_e4m3fn).to(torch.float64).numpy()


def _e4m3_positive_table() -> np.ndarray:
    # Codes 0x00..0x7e are the non-negative finite values in increasing order; 0x7f is NaN.
    return e4m3_decode(np.arange(0x7F, dtype=np.uint8))


_E4M3_POS = _e4m3_positive_table()


def e4m3_encode(x) -> np.ndarray:
    """float64 values (|x| <= 448, finite) -> uint8 e4m3 codes, round to nearest, ties to even.

    The sign of zero and of values that round to zero is kept, as CUDA's and c10's conversions do.
    """
    x = np.asarray(x, dtype=np.float64)
    mag = np.abs(x)
    if not np.all(mag <= E4M3_MAX):
        raise ValueError("e4m3_encode: |x| must be <= 448")
    hi = np.clip(np.searchsorted(_E4M3_POS, mag), 0, len(_E4M3_POS) - 1)
    lo = np.maximum(hi - 1, 0)
    d_lo = mag - _E4M3_POS[lo]
    d_hi = _E4M3_POS[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    return code | np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))


def bf16_decode(bits) -> np.ndarray:
    """uint16 bf16 bit patterns -> float64."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(
        np.float64
    )


def quant_scale(amax, pow2_scale: bool) -> np.ndarray:
    """float32 scale(s) of blocks with float32 absolute maxima ``amax``."""
    amax = np.maximum(np.asarray(amax, dtype=np.float32), SCALE_AMAX_FLOOR)
    # float64 division then one rounding to float32 equals float32 division (53 >= 2*24 + 2).
    scale = (amax.astype(np.float64) / E4M3_MAX).astype(np.float32)
    if pow2_scale:
        mant, exp = np.frexp(scale.astype(np.float64))
        scale = np.ldexp(1.0, exp - (mant == 0.5)).astype(np.float32)
    return scale


def quantize_blocks(x, block: int, pow2_scale: bool):
    """float values [..., D] -> (uint8 e4m3 codes [..., D], float32 scales [..., D / block])."""
    x = np.asarray(x, dtype=np.float64)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = quant_scale(np.abs(blocks).max(axis=-1), pow2_scale)
    q = np.clip(blocks / scale[..., None].astype(np.float64), -E4M3_MAX, E4M3_MAX)
    return e4m3_encode(q).reshape(x.shape), scale


# ----------------------------------------------------------------------------------------------
# layouts and scores


def _page_bytes(kv_cache, row_bytes: int) -> np.ndarray:
    """uint8 (or bf16) cache [pages, 64, 1, W] -> uint8 [pages, 64 * row_bytes]."""
    raw = np.ascontiguousarray(_np(kv_cache)).view(np.uint8)
    return raw.reshape(raw.shape[0], PAGE_SIZE * row_bytes)


def _scores(q: np.ndarray, k: np.ndarray, k_scale: np.ndarray, w: np.ndarray) -> np.ndarray:
    """q [R, H, D], k [M, D], k_scale [M], w [R, H] -> [R, M] = s_k * sum_h w * relu(q . k)."""
    dots = np.maximum(q @ k.T, 0.0)
    return np.einsum("rh,rhm->rm", w, dots) * k_scale[None, :]


# ----------------------------------------------------------------------------------------------
# indexer


def indexer_logits(q, k, k_scale, weights, ks, ke) -> torch.Tensor:
    """I[t, s] = k_scale[s] * sum_h weights[t, h] * relu(q[t, h] . k[s]) on [ks[t], ke[t]), -inf off.

    q [S, H, D] e4m3, k [N, D] e4m3, k_scale [N], weights [S, H], ks/ke [S] -> float64 [S, N].
    """
    qf, kf = _f64(q), _f64(k)
    ks_, ke_ = _np(ks).astype(np.int64), _np(ke).astype(np.int64)
    n = kf.shape[0]
    if not np.all((0 <= ks_) & (ks_ <= ke_) & (ke_ <= n)):
        raise ValueError("reference.indexer_logits: windows must satisfy 0 <= ks <= ke <= N")
    out = _scores(qf, kf, _f64(k_scale), _f64(weights))
    cols = np.arange(n)[None, :]
    out[(cols < ks_[:, None]) | (cols >= ke_[:, None])] = -np.inf
    return torch.from_numpy(out)


def decode_indexer_k_cache(kv_cache) -> tuple[np.ndarray, np.ndarray]:
    """Indexer cache uint8 [pages, 64, 1, D + 4] -> (keys float64 [pages, 64, D], scales [pages, 64])."""
    d = kv_cache.shape[-1] - 4
    pages = _page_bytes(kv_cache, d + 4).view(_indexer_page_dtype(d)).reshape(-1)
    return e4m3_decode(pages["k"]), pages["scale"].astype(np.float64)


def paged_visible_ends(context_lens, next_n: int, max_context_len: int) -> np.ndarray:
    """[B * next_n] one-past-last visible position of row (b, j): len_b - next_n + j + 1."""
    lens = _np(context_lens).astype(np.int64)
    ends = lens[:, None] - next_n + np.arange(next_n)[None, :] + 1
    return np.clip(ends, 0, max_context_len).reshape(-1)


def indexer_logits_paged(q, kv_cache, weights, context_lens, block_table, max_context_len) -> torch.Tensor:
    """Paged decode indexer scores -> float64 [B * next_n, max_context_len].

    q [B, n, H, D] e4m3; kv_cache uint8 [pages, 64, 1, D + 4]; weights [B * n, H];
    context_lens [B]; block_table [B, max_pages]. Position p of batch b is row p % 64 of page
    block_table[b, p // 64]; only pages holding visible positions are read.
    """
    b_, n_, h_, d_ = q.shape
    keys, scales = decode_indexer_k_cache(kv_cache)
    qf = _f64(q).reshape(b_ * n_, h_, d_)
    w = _f64(weights)
    table = _np(block_table).astype(np.int64)
    ends = paged_visible_ends(context_lens, n_, max_context_len)
    out = np.full((b_ * n_, max_context_len), -np.inf)
    for b in range(b_):
        span = int(ends[b * n_: (b + 1) * n_].max(initial=0))
        pos = np.arange(span)
        page, row = table[b, pos // PAGE_SIZE], pos % PAGE_SIZE
        for j in range(n_):
            r = b * n_ + j
            e = int(ends[r])
            out[r, :e] = _scores(qf[r: r + 1], keys[page[:e], row[:e]], scales[page[:e], row[:e]],
                                 w[r: r + 1])[0]
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# top-k


def topk_order(values) -> np.ndarray:
    """Positions of ``values`` (1-D) from best to worst: NaN last, then descending value, ties by
    ascending position. -0.0 and +0.0 are equal."""
    v = np.asarray(values, dtype=np.float64)
    isnan = np.isnan(v)
    neg = np.where(isnan, 0.0, -v)
    return np.lexsort((np.arange(v.shape[0]), neg, isnan))


def topk(logits, k: int, row_starts=None, row_ends=None) -> torch.Tensor:
    """The k best columns of each row window [start, end) of ``logits`` [R, C] -> int32 [R, k],
    absolute column indices in sorted order, -1 padded."""
    v = _f64(logits)
    r_, c_ = v.shape
    starts = np.zeros(r_, np.int64) if row_starts is None else _np(row_starts).astype(np.int64)
    ends = np.full(r_, c_, np.int64) if row_ends is None else _np(row_ends).astype(np.int64)
    if not np.all((0 <= starts) & (starts <= ends) & (ends <= c_)):
        raise ValueError("reference.topk: windows must satisfy 0 <= start <= end <= C")
    out = np.full((r_, k), -1, np.int32)
    for r in range(r_):
        best = topk_order(v[r, starts[r]: ends[r]])[:k] + starts[r]
        out[r, : best.shape[0]] = best
    return torch.from_numpy(out)


def indexer_topk(q, k, k_scale, weights, ks, ke, topk_: int) -> torch.Tensor:
    """topk(indexer_logits(...), topk_, ks, ke) -> int32 [S, topk_]."""
    return topk(indexer_logits(q, k, k_scale, weights, ks, ke), topk_, ks, ke)


def indexer_topk_paged(q, kv_cache, weights, context_lens, block_table, max_context_len,
                       topk_: int) -> torch.Tensor:
    """topk over the paged scores' visible prefixes -> int32 [B * next_n, topk_] positions."""
    scores = indexer_logits_paged(q, kv_cache, weights, context_lens, block_table, max_context_len)
    ends = paged_visible_ends(context_lens, q.shape[1], max_context_len)
    return topk(scores, topk_, None, torch.from_numpy(ends))


# ----------------------------------------------------------------------------------------------
# sparse MLA


def _attend(q: np.ndarray, kv: np.ndarray, sm_scale: float, d_v: int):
    """q [Hq, 576], kv [m, 576] (m may be 0; repeated rows count repeatedly) -> (out [Hq, d_v], lse [Hq])."""
    if kv.shape[0] == 0:
        return np.zeros((q.shape[0], d_v)), np.full(q.shape[0], -np.inf)
    s = sm_scale * (q @ kv.T)
    m = s.max(axis=1, keepdims=True)
    p = np.exp(s - m)
    denom = p.sum(axis=1, keepdims=True)
    return (p / denom) @ kv[:, :d_v], (np.log(denom) + m)[:, 0]


def sparse_mla_prefill(q, kv, indices, sm_scale: float, d_v: int = MLA_LATENT):
    """q [S, Hq, 576] bf16, kv [N, 1, 576] bf16, indices [S, k] (-1 skipped) ->
    (out float64 [S, Hq, d_v], lse float64 [S, Hq])."""
    qf = _f64(q)
    kvf = _f64(kv).reshape(-1, MLA_DIM)
    idx = _np(indices).astype(np.int64)
    if not np.all((idx >= -1) & (idx < kvf.shape[0])):
        raise ValueError("reference.sparse_mla_prefill: indices must be -1 or in [0, N)")
    s_, hq = qf.shape[:2]
    out, lse = np.zeros((s_, hq, d_v)), np.zeros((s_, hq))
    for s in range(s_):
        sel = idx[s][idx[s] >= 0]
        out[s], lse[s] = _attend(qf[s], kvf[sel], sm_scale, d_v)
    return torch.from_numpy(out), torch.from_numpy(lse)


def decode_mla_kv_cache(kv_cache) -> np.ndarray:
    """MLA cache (bf16 [pages, 64, 1, 576] or uint8 [pages, 64, 1, 656]) -> float64 [pages, 64, 576],
    FP8 rows dequantised (e4m3 * per-128 scale | bf16 rope)."""
    if kv_cache.dtype == torch.bfloat16:
        return _f64(kv_cache).reshape(kv_cache.shape[0], PAGE_SIZE, MLA_DIM)
    rows = _page_bytes(kv_cache, MLA_FP8_ROW_BYTES).view(_MLA_FP8_ROW).reshape(-1)
    nope = e4m3_decode(rows["nope"]).reshape(-1, MLA_LATENT // MLA_FP8_BLOCK, MLA_FP8_BLOCK)
    nope = (nope * rows["scale"].astype(np.float64)[:, :, None]).reshape(-1, MLA_LATENT)
    full = np.concatenate([nope, bf16_decode(rows["rope"])], axis=1)
    return full.reshape(kv_cache.shape[0], PAGE_SIZE, MLA_DIM)


def sparse_mla_decode(q, kv_cache, indices, block_table, sm_scale: float, d_v: int = MLA_LATENT):
    """q [B, n, Hq, 576] bf16; paged MLA cache; indices [B, n, k] positions (-1 skipped);
    block_table [B, max_pages] -> (out float64 [B, n, Hq, d_v], lse float64 [B, n, Hq])."""
    qf = _f64(q)
    rows = decode_mla_kv_cache(kv_cache)
    idx = _np(indices).astype(np.int64)
    table = _np(block_table).astype(np.int64)
    if not np.all((idx >= -1) & (idx < table.shape[1] * PAGE_SIZE)):
        raise ValueError("reference.sparse_mla_decode: indices must be -1 or inside the block table")
    b_, n_, hq = qf.shape[:3]
    out, lse = np.zeros((b_, n_, hq, d_v)), np.zeros((b_, n_, hq))
    for b in range(b_):
        for j in range(n_):
            pos = idx[b, j][idx[b, j] >= 0]
            kv = rows[table[b, pos // PAGE_SIZE], pos % PAGE_SIZE]
            out[b, j], lse[b, j] = _attend(qf[b, j], kv, sm_scale, d_v)
    return torch.from_numpy(out), torch.from_numpy(lse)


# ----------------------------------------------------------------------------------------------
# cache writers (functional)


def _slots(slot_mapping, num_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens that are written and their slots (negative slots skip their token)."""
    slots = _np(slot_mapping).astype(np.int64)
    if np.any(slots >= num_pages * PAGE_SIZE):
        raise ValueError("reference: slot_mapping out of range")
    tokens = np.nonzero(slots >= 0)[0]
    return tokens, slots[tokens]


def indexer_k_quant_and_cache(k, kv_cache, slot_mapping, pow2_scale: bool = True) -> torch.Tensor:
    """Copy of the indexer cache uint8 [pages, 64, 1, D + 4] with token t of k [T, D] bf16 quantised
    (one scale per token) and written at slot_mapping[t] = page * 64 + row."""
    d = k.shape[-1]
    pages = _page_bytes(kv_cache, d + 4).copy()
    view = pages.view(_indexer_page_dtype(d)).reshape(-1)
    tokens, slots = _slots(slot_mapping, pages.shape[0])
    codes, scale = quantize_blocks(_f64(k)[tokens], d, pow2_scale)
    view["k"][slots // PAGE_SIZE, slots % PAGE_SIZE] = codes
    view["scale"][slots // PAGE_SIZE, slots % PAGE_SIZE] = scale[:, 0]
    return torch.from_numpy(pages).reshape(kv_cache.shape)


def mla_kv_cache_insert(kv_c, k_pe, kv_cache, slot_mapping, pow2_scale: bool = False) -> torch.Tensor:
    """Copy of the MLA cache with row [kv_c[t] | k_pe[t]] written at slot_mapping[t]: bf16 caches
    get the bf16 bits, FP8 caches e4m3 codes with one float32 scale per 128 latent values and the
    rope as bf16."""
    tokens, slots = _slots(slot_mapping, kv_cache.shape[0])
    if kv_cache.dtype == torch.bfloat16:
        rows = _np(kv_cache).reshape(-1, MLA_DIM).copy()
        rows[slots] = np.concatenate([_np(kv_c)[tokens], _np(k_pe)[tokens]], axis=1)
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).reshape(kv_cache.shape)
    rows = _page_bytes(kv_cache, MLA_FP8_ROW_BYTES).copy().view(_MLA_FP8_ROW).reshape(-1)
    codes, scale = quantize_blocks(_f64(kv_c)[tokens], MLA_FP8_BLOCK, pow2_scale)
    rows["nope"][slots] = codes
    rows["scale"][slots] = scale
    rows["rope"][slots] = _np(k_pe)[tokens]
    return torch.from_numpy(rows.view(np.uint8)).reshape(kv_cache.shape)
