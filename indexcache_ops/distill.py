"""Training-aware IndexCache: the multi-layer distillation loss of a retained (Full) indexer.

A Full layer's indexer chooses the keys that it and the ``m`` Shared layers after it attend to, so
it is trained to match all of them at once: against the average of their attention distributions,

    L = Σ_t KL(p̄_t ‖ q_t),   p̄_t = (1/(m+1)) Σ_{j=0..m} p_t^(j),   q_t = softmax(I_t),

where ``p^(j)`` is the head-summed, L1-normalised attention of served layer ``j`` (the Full layer
itself is ``j = 0``) and ``I_t`` are the Full layer's indexer scores of query ``t``.

Why this equals training against every layer separately: with ``H(p) = Σ p log p``,
``KL(p̄‖q) = H(p̄) − Σ p̄ log q`` and ``Σ_j KL(p^(j)‖q) = Σ_j H(p^(j)) − (m+1) Σ p̄ log q``. The
entropies do not depend on the indexer, so

    ∇_I Σ_j KL(p^(j) ‖ q) = (m+1) · ∇_I KL(p̄ ‖ q) = (m+1) · (q − p̄),

i.e. this loss has the gradient of the sum of the per-layer KLs divided by ``m+1`` (the mean of the
per-layer KLs), at the cost of one KL instead of ``m+1``.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["multi_layer_distillation_loss"]


def multi_layer_distillation_loss(
    indexer_scores: torch.Tensor,
    served_attention: Iterable[torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Return ``Σ_t KL(p̄_t ‖ q_t)``: a Full layer's indexer against the layers it serves.

    Two forms, matching the two training stages of DSA indexers:

    - dense (warm-up): over every visible key; ``mask[t, s]`` says whether query ``t`` sees key
      ``s`` (``None``: all keys are visible);
    - sparse: over the keys the indexer selected, ``selected[t, i]`` (``-1`` or any negative
      value is padding). Both ``p̄`` and ``q`` are gathered at the selected keys and renormalised
      over them.

    For every served layer, ``p`` is its attention summed over heads and L1-normalised over its
    whole key axis; ``p̄`` is their mean, then restricted to the visible (or selected) keys and
    renormalised over them; ``q`` is the softmax of the indexer scores over the same keys. Entries
    of ``p̄`` that are 0 contribute 0 whatever ``q`` is (``0 · log 0 = 0``), so indexer scores of
    ``-inf`` on keys the teacher does not attend to are fine. A row without a visible key, or
    whose teacher puts no mass on its visible keys, has no target: it contributes 0 (never NaN)
    and gets no gradient; a served layer whose attention row is all zero adds nothing to that
    row's ``p̄``.

    The gradient w.r.t. ``indexer_scores`` is ``q − p̄`` per contributing row: the gradient of
    ``Σ_j KL(p^(j) ‖ q)`` divided by ``m+1`` (see the module docstring). That identity is exact when
    every served layer has the same attention mass on the kept keys (in particular when its
    attention lies within them: causal attention with a causal mask, sparse attention over the
    selected keys); otherwise each layer is weighted by its mass on the kept keys.

    Args:
        indexer_scores: ``[T, N]`` floating indexer scores of the Full layer (the student; gradients
            flow into it). Computed in float32, or float64 when given float64.
        served_attention: the attention of each served layer, the Full layer included: an iterable
            (list, tuple or generator) of ``[T, H, N]`` per-head or ``[T, N]`` head-aggregated
            non-negative tensors over the same keys as ``indexer_scores``. They are teachers
            (detached) and are consumed one at a time into a running ``[T, N]`` (or ``[T, k]``)
            sum, so a generator that computes each layer on the fly keeps memory independent of
            ``m``.
            A single tensor is refused (ambiguous); pass ``list(t)`` or ``t.unbind(0)``.
        mask: ``[T, N]`` bool, ``True`` where the key is visible (dense form only).
        selected: ``[T, k]`` int32/int64 key indices, distinct per row, negative = padding (sparse
            form; exclusive with ``mask``). Indices ``>= N`` are an error of ``torch.gather``.
        reduction: ``"sum"`` over rows, or ``"mean"`` over the contributing rows (0 when none).

    Returns:
        A scalar tensor of the accumulation dtype.

    Raises:
        ValueError: bad shapes, dtypes, devices, reduction, or no served layer.
        TypeError: ``served_attention`` is a tensor.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not isinstance(indexer_scores, torch.Tensor) or indexer_scores.dim() != 2 \
            or not indexer_scores.is_floating_point():
        raise ValueError("indexer_scores must be a 2-D floating tensor [T, N], got "
                         f"{_describe(indexer_scores)}")
    if isinstance(served_attention, torch.Tensor):
        raise TypeError("served_attention must be an iterable of per-layer tensors, not one tensor "
                        f"({_describe(served_attention)}); pass list(t) or t.unbind(0)")
    if mask is not None and selected is not None:
        raise ValueError("pass either mask (dense form) or selected (sparse form), not both")
    T, N = indexer_scores.shape
    device = indexer_scores.device
    acc_dtype = torch.float64 if indexer_scores.dtype == torch.float64 else torch.float32

    if selected is None:
        if mask is None:
            valid = torch.ones(T, N, dtype=torch.bool, device=device)
        else:
            _check_tensor(mask, "mask", (T, N), device)
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool, got {mask.dtype}")
            valid = mask
        gather_index = None
    else:
        _check_tensor(selected, "selected", (T, None), device)
        if selected.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"selected must be int32 or int64, got {selected.dtype}")
        valid = selected >= 0
        # Padding reads key 0 so gather stays in bounds; `valid` zeroes it out below.
        gather_index = torch.where(valid, selected, 0).long()

    def restrict(x: torch.Tensor) -> torch.Tensor:
        return x if gather_index is None else x.gather(1, gather_index)

    teacher_sum = None
    for layer, attention in enumerate(served_attention):
        term = restrict(_normalised_attention(attention, layer, (T, N), device, acc_dtype))
        teacher_sum = term if teacher_sum is None else teacher_sum.add_(term)
    if teacher_sum is None:
        raise ValueError("served_attention is empty: a Full layer serves at least itself")

    # The 1/(m+1) of p̄ cancels in the renormalisation over the kept keys, so it is not applied.
    p_bar = torch.where(valid, teacher_sum, 0)
    mass = p_bar.sum(-1, keepdim=True)
    has_target = mass > 0
    p_bar = p_bar / torch.where(has_target, mass, 1)

    scores = restrict(indexer_scores).to(acc_dtype)
    # Rows without a target get finite scores so their (unused) log_softmax cannot make NaN
    # gradients.
    scores = torch.where(has_target, torch.where(valid, scores, float("-inf")), 0)
    log_q = torch.log_softmax(scores, dim=-1)
    cross = torch.where(p_bar > 0, p_bar * log_q, 0)
    kl = (torch.special.xlogy(p_bar, p_bar) - cross).sum()
    if reduction == "mean":
        kl = kl / has_target.sum().clamp_min(1)
    return kl


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _check_tensor(x, name: str, shape: tuple, device: torch.device) -> None:
    """Check ``x`` is a tensor on ``device`` of ``shape`` (``None`` entries match any size)."""
    if not isinstance(x, torch.Tensor) or x.dim() != len(shape) or x.device != device \
            or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        wanted = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
        raise ValueError(f"{name} must be a tensor of shape {wanted} on {device}, "
                         f"got {_describe(x)}")


def _normalised_attention(attention, layer: int, shape: tuple, device, acc_dtype) -> torch.Tensor:
    """One served layer's ``p``: ``[T, N]`` head-summed, L1-normalised, detached, ``acc_dtype``."""
    T, N = shape
    # Per-head [T, H, N] when 3-D; anything else must be the head-aggregated [T, N].
    per_head = isinstance(attention, torch.Tensor) and attention.dim() == 3
    _check_tensor(attention, f"served_attention[{layer}]", (T, None, N) if per_head else (T, N),
                  device)
    attention = attention.detach()
    # sum(dtype=...) accumulates bf16/fp16 attention in acc_dtype without a full-size upcast copy.
    heads = attention.sum(1, dtype=acc_dtype) if per_head else attention.to(acc_dtype)
    total = heads.sum(-1, keepdim=True)
    return heads / torch.where(total > 0, total, 1)
