"""Quantisation and cache-layout helpers for callers of the ops (pure torch, CPU and CUDA).

DeepSeek-V3.2's indexer rotates q and k with a normalised Walsh-Hadamard transform, quantises them
to FP8 e4m3 (q: one scale per (token, head); k: one per token; scale = amax / 448, rounded up to a
power of two in the released model) and folds the q scale into the head weights. These helpers do
the same so that a caller (or a test) can build the ops' inputs from bf16/fp32 activations, and
pack/unpack the two paged cache layouts the ops read:

- indexer K cache, uint8 ``[num_pages, 64, 1, D + 4]`` (DeepGEMM): page p holds 64 rows of D e4m3
  bytes, then 64 float32 scales (byte offset ``p * 64 * (D + 4) + 64 * D + 4 * row``);
- MLA cache, bf16 ``[num_pages, 64, 1, 576]`` rows ``[kv_c (512) | k_pe (64)]``, or FP8 uint8
  ``[num_pages, 64, 1, 656]`` rows ``[512 e4m3 | 4 float32 scales (one per 128) | 64 bf16 rope]``.

Token slots are ``page * 64 + row`` (vLLM's slot_mapping); a negative slot skips its token.
"""

from __future__ import annotations

import math

import torch

PAGE_SIZE = 64
E4M3_MAX = 448.0
# amax floor: an all-zero block gets scale 1e-4 / 448 instead of 0, so x / scale stays finite
# (and the block still encodes as zeros). Same floor as DeepSeek-V3.2's act_quant and vLLM.
AMAX_FLOOR = 1e-4
MLA_LATENT = 512
MLA_ROPE = 64
MLA_FP8_BLOCK = 128
MLA_FP8_ROW_BYTES = MLA_LATENT + (MLA_LATENT // MLA_FP8_BLOCK) * 4 + MLA_ROPE * 2

__all__ = [
    "quantize_fp8_per_block",
    "dequantize_fp8_per_block",
    "fold_indexer_weights",
    "hadamard",
    "pack_indexer_k_cache",
    "unpack_indexer_k_cache",
    "pack_mla_kv_cache",
    "unpack_mla_kv_cache",
]


def _ceil_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (positive, normal float32), exactly: from the exponent bits,
    since exp2(ceil(log2(s))) misrounds just above a power of two."""
    mant, exp = torch.frexp(scale)
    exp = exp - (mant == 0.5).to(exp.dtype)
    return ((exp + 127).to(torch.int32) << 23).view(torch.float32)


def quantize_fp8_per_block(x: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """Per-block FP8 e4m3 quantisation over the last dimension.

    Args:
        x: ``[..., D]`` float tensor (bf16/fp16/fp32), ``D % block == 0``.
        block: values per scale.
        pow2_scale: round every scale up to a power of two (DeepSeek-V3.2's UE8M0 scales; makes
            dequantisation exact in any float format).

    Returns:
        ``(x_fp8, scale)``: x_fp8 ``[..., D]`` float8_e4m3fn, scale ``[..., D / block]`` float32 with
        ``scale = max(amax, 1e-4) / 448`` (amax over the block, computed in float32) and
        ``x_fp8 = round_to_nearest_even(x / scale)``, saturated to ±448; ``x ≈ x_fp8 * scale``.
    """
    d = x.shape[-1]
    if d % block != 0:
        raise ValueError(f"quantize_fp8_per_block: last dim {d} is not a multiple of block {block}")
    xb = x.float().unflatten(-1, (d // block, block))
    amax = xb.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    # A tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, which is
    # off by an ulp from the correctly rounded amax / 448 that the kernels and reference compute.
    scale = amax / torch.full_like(amax, E4M3_MAX)
    if pow2_scale:
        scale = _ceil_pow2(scale)
    q = (xb / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def dequantize_fp8_per_block(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_per_block`: ``[..., D]`` e4m3 and ``[..., D / block]`` scales
    -> float32 ``x_fp8 * scale`` with each scale applied to its block."""
    block = x_fp8.shape[-1] // scale.shape[-1]
    return (x_fp8.float().unflatten(-1, (scale.shape[-1], block)) * scale.unsqueeze(-1)).flatten(-2)


def fold_indexer_weights(weights: torch.Tensor, q_scale: torch.Tensor, num_heads: int,
                         head_dim: int) -> torch.Tensor:
    """Fold the q quantisation scale and the constants into the indexer head weights.

    ``w'[t, h] = w[t, h] * H^-1/2 * D^-1/2 * s_q[t, h]`` (legal because ReLU(s x) = s ReLU(x) for
    s > 0), the ``weights`` argument of the indexer ops.

    Args:
        weights: ``[S, H]`` head weights (any float dtype).
        q_scale: ``[S, H]`` or ``[S, H, 1]`` per-(token, head) q scales.
        num_heads: H.  head_dim: D.

    Returns:
        float32 ``[S, H]``, contiguous.
    """
    if weights.shape[-1] != num_heads:
        raise ValueError(f"fold_indexer_weights: weights has {weights.shape[-1]} heads, expected {num_heads}")
    q_scale = q_scale.reshape(weights.shape)
    folded = weights.float() * (num_heads ** -0.5) * q_scale.float() * (head_dim ** -0.5)
    return folded.contiguous()


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform over the last dimension (Sylvester order).

    ``y = x @ H_n / sqrt(n)`` with ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, n = x.shape[-1]
    a power of two; orthonormal and its own inverse. Computed in float32 (float64 for float64
    input) by n log n butterflies; returns x's dtype and shape.
    """
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)


def _written(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with a non-negative slot, those slots as int64)."""
    slots = slot_mapping.to(torch.int64)
    tokens = torch.nonzero(slots >= 0).flatten()
    return tokens, slots[tokens]


def pack_indexer_k_cache(k_fp8: torch.Tensor, k_scale: torch.Tensor, slot_mapping: torch.Tensor,
                         num_pages: int) -> torch.Tensor:
    """Build a zero-filled indexer K cache holding token t at slot_mapping[t].

    Args:
        k_fp8: ``[T, D]`` float8_e4m3fn keys.  k_scale: ``[T]`` (or ``[T, 1]``) float32 scales.
        slot_mapping: ``[T]`` integer slots ``page * 64 + row``; negative skips the token.
        num_pages: pages in the cache.

    Returns:
        uint8 ``[num_pages, 64, 1, D + 4]`` on k_fp8's device, DeepGEMM's layout.
    """
    t, d = k_fp8.shape
    cache = torch.zeros(num_pages, PAGE_SIZE * (d + 4), dtype=torch.uint8, device=k_fp8.device)
    tokens, slots = _written(slot_mapping.to(k_fp8.device))
    page, row = slots // PAGE_SIZE, slots % PAGE_SIZE
    key_cols = row[:, None] * d + torch.arange(d, device=cache.device)
    cache[page[:, None], key_cols] = k_fp8[tokens].view(torch.uint8)
    scale_cols = PAGE_SIZE * d + row[:, None] * 4 + torch.arange(4, device=cache.device)
    scale_bytes = k_scale.reshape(t).to(torch.float32)[tokens].contiguous().view(torch.uint8)
    cache[page[:, None], scale_cols] = scale_bytes.view(-1, 4)
    return cache.view(num_pages, PAGE_SIZE, 1, d + 4)


def unpack_indexer_k_cache(kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Read tokens back from an indexer K cache.

    Args:
        kv_cache: uint8 ``[num_pages, 64, 1, D + 4]``.
        slot_mapping: ``[T]`` non-negative slots (for position p of a sequence with block table
            row ``bt``: ``bt[p // 64] * 64 + p % 64``).

    Returns:
        ``(k_fp8 [T, D] float8_e4m3fn, k_scale [T] float32)``.
    """
    num_pages, d = kv_cache.shape[0], kv_cache.shape[-1] - 4
    pages = kv_cache.reshape(num_pages, PAGE_SIZE * (d + 4))
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.int64)
    page, row = slots // PAGE_SIZE, slots % PAGE_SIZE
    keys = pages[page[:, None], row[:, None] * d + torch.arange(d, device=kv_cache.device)]
    scale_cols = PAGE_SIZE * d + row[:, None] * 4 + torch.arange(4, device=kv_cache.device)
    scales = pages[page[:, None], scale_cols].contiguous().view(torch.float32).reshape(-1)
    return keys.view(torch.float8_e4m3fn), scales


def pack_mla_kv_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
                      num_pages: int, fp8: bool = False, pow2_scale: bool = False) -> torch.Tensor:
    """Build a zero-filled MLA cache holding row ``[kv_c[t] | k_pe[t]]`` at slot_mapping[t].

    Args:
        kv_c: ``[T, 512]`` latent, k_pe: ``[T, 64]`` rope (converted to bf16).
        slot_mapping: ``[T]`` slots ``page * 64 + row``; negative skips the token.
        num_pages: pages in the cache.
        fp8: build the FP8 cache (latent quantised per 128 values with
            :func:`quantize_fp8_per_block`, rope kept bf16) instead of the bf16 one.
        pow2_scale: power-of-two FP8 scales.

    Returns:
        bf16 ``[num_pages, 64, 1, 576]`` or, with fp8, uint8 ``[num_pages, 64, 1, 656]``.
    """
    tokens, slots = _written(slot_mapping.to(kv_c.device))
    latent, rope = kv_c[tokens].to(torch.bfloat16), k_pe[tokens].to(torch.bfloat16)
    if not fp8:
        cache = torch.zeros(num_pages * PAGE_SIZE, MLA_LATENT + MLA_ROPE, dtype=torch.bfloat16,
                            device=kv_c.device)
        cache[slots] = torch.cat((latent, rope), dim=1)
        return cache.view(num_pages, PAGE_SIZE, 1, MLA_LATENT + MLA_ROPE)
    codes, scale = quantize_fp8_per_block(latent, MLA_FP8_BLOCK, pow2_scale)
    rows = torch.cat((codes.view(torch.uint8), scale.contiguous().view(torch.uint8),
                      rope.contiguous().view(torch.uint8)), dim=1)
    cache = torch.zeros(num_pages * PAGE_SIZE, MLA_FP8_ROW_BYTES, dtype=torch.uint8, device=kv_c.device)
    cache[slots] = rows
    return cache.view(num_pages, PAGE_SIZE, 1, MLA_FP8_ROW_BYTES)


def unpack_mla_kv_cache(kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Read rows back from an MLA cache.

    Args:
        kv_cache: bf16 ``[num_pages, 64, 1, 576]`` or uint8 ``[num_pages, 64, 1, 656]``.
        slot_mapping: ``[T]`` non-negative slots.

    Returns:
        ``[T, 576]``: the bf16 rows of a bf16 cache, or float32 dequantised rows
        ``[e4m3 * scale | rope]`` of an FP8 cache.
    """
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.int64)
    rows = kv_cache.reshape(-1, kv_cache.shape[-1])[slots]
    if kv_cache.dtype == torch.bfloat16:
        return rows
    nope = rows[:, :MLA_LATENT].view(torch.float8_e4m3fn)
    scale = rows[:, MLA_LATENT: MLA_LATENT + 16].contiguous().view(torch.float32)
    rope = rows[:, MLA_LATENT + 16:].contiguous().view(torch.bfloat16)
    return torch.cat((dequantize_fp8_per_block(nope, scale), rope.float()), dim=1)
