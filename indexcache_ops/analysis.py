"""How much the top-k selections of different layers agree: the measurement behind IndexCache.

IndexCache rests on the observation that adjacent DSA layers select nearly the same keys (70–100 %
overlap) while distant layers do not (≤ 40 %). These helpers measure that on captured top-k
indices, vectorised (sort + binary search) so they run on the device that holds the indices.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["overlap_matrix", "topk_overlap"]


def _check_indices(x, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype == torch.bool \
            or x.is_floating_point() or x.is_complex():
        described = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
            else type(x).__name__
        raise ValueError(f"{name} must be a 2-D integer index tensor [R, k], got {described}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")


def _sorted_sets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row ascending (int64); return it and the mask of its distinct valid entries."""
    values = x.long().sort(dim=1).values
    member = values >= 0
    # After sorting, a repeated index sits right after its first copy: count it once.
    member[:, 1:] &= values[:, 1:] != values[:, :-1]
    return values, member


def _overlap_sorted(a_values, a_member, b_values) -> torch.Tensor:
    """Per-row ``|A ∩ B| / |A|`` (1.0 when A is empty) from :func:`_sorted_sets` outputs."""
    # Binary-search every element of a in the sorted row of b; b's negative padding sorts first and
    # never equals a member of A, which is non-negative.
    position = torch.searchsorted(b_values, a_values).clamp_max_(b_values.shape[1] - 1)
    hits = (a_member & (b_values.gather(1, position) == a_values)).sum(1)
    size = a_member.sum(1)
    return torch.where(size > 0, hits / size.clamp_min(1), 1.0)


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return, per row, the fraction of the keys selected in ``a`` that ``b`` selects too.

    ``a`` is ``[R, ka]`` and ``b`` is ``[R, kb]`` integer index tensors (int32 or int64, the same
    device, any order within a row; ``ka`` and ``kb`` may differ). Negative entries (the ``-1``
    padding of top-k) are ignored and repeated indices count once, so with ``A`` and ``B`` the sets
    of valid indices of a row the result is ``|A ∩ B| / |A|`` — the share of ``a``'s selection that
    ``b`` keeps (asymmetric when ``|A| ≠ |B|``). A row where ``a`` has no valid index gives 1.0:
    there is nothing of ``a`` that ``b`` misses, and the value stays NaN-free so means over rows
    are defined (drop such rows first if they should not count).

    Returns:
        ``[R]`` float32 on the device of the inputs.
    """
    _check_indices(a, "a")
    _check_indices(b, "b")
    if a.shape[0] != b.shape[0] or a.device != b.device:
        raise ValueError(f"a and b must have the same number of rows on the same device, got "
                         f"{tuple(a.shape)} on {a.device} and {tuple(b.shape)} on {b.device}")
    return _overlap_sorted(*_sorted_sets(a), _sorted_sets(b)[0])


def overlap_matrix(indices_per_layer: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Return the ``[L, L]`` matrix of mean top-k overlaps between layers.

    ``indices_per_layer`` holds each layer's top-k indices for the same queries: a sequence of ``L``
    ``[R, k]`` integer tensors (``k`` may differ between layers) or one ``[L, R, k]`` tensor. Entry
    ``[i, j]`` is the mean over the ``R`` rows of ``topk_overlap(layer_i, layer_j)``: the share of
    layer ``i``'s selection that layer ``j`` also selects (symmetric when every row selects the same
    number of keys in both; the diagonal is 1). Rows with no valid index in layer ``i`` count as
    1.0, as in :func:`topk_overlap`. Each layer is sorted once; memory stays ``O(R·k)`` per pair.

    Returns:
        ``[L, L]`` float32 on the device of the inputs.
    """
    layers = list(indices_per_layer)
    for i, x in enumerate(layers):
        _check_indices(x, f"indices_per_layer[{i}]")
        if x.shape[0] != layers[0].shape[0] or x.device != layers[0].device:
            raise ValueError(f"every layer must have the rows of layer 0 ({tuple(layers[0].shape)} "
                             f"on {layers[0].device}); layer {i} is {tuple(x.shape)} on {x.device}")
    if not layers or layers[0].shape[0] == 0:
        raise ValueError("indices_per_layer must hold at least one layer with at least one row")
    sets = [_sorted_sets(x) for x in layers]
    # Means stay on the device and are stacked once, so no host synchronisation per pair.
    rows = [torch.stack([_overlap_sorted(a_values, a_member, b_values).mean()
                         for b_values, _ in sets])
            for a_values, a_member in sets]
    return torch.stack(rows)
