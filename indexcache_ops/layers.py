"""Layer-pattern vocabulary shared by the reuse API and the layer search: argument checks for
layer counts, 'F'/'S' patterns and pipeline-stage starts, and conversions between patterns and
Full-layer lists. Pure Python (no compiled extension), so the search runs anywhere.

Errors are ``ValueError("<name>: expected <what>, got <value>")``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["check_int", "check_layer_counts", "check_pattern", "check_stage_starts", "pattern_to_layers",
           "layers_to_pattern", "uniform_pattern"]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (numpy and torch integers accepted), refusing bools and floats:
    ``index_topk_freq: true`` or ``2.5`` in a config is a mistake, not a number of layers."""
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int{bound}, got {value!r} (bool)")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name}: expected an int{bound}, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name}: expected an int{bound}, got {number}")
    return number


def check_pattern(pattern: Any, num_layers: int | None = None,
                  name: str = "index_topk_pattern") -> str:
    """An ``index_topk_pattern``: only 'F'/'S', layer 0 Full, one character per layer."""
    if not isinstance(pattern, str):
        raise ValueError(
            f"{name}: expected a string of 'F'/'S', got {pattern!r} ({type(pattern).__name__})")
    if num_layers is not None and len(pattern) != num_layers:
        raise ValueError(f"{name}: expected one character per layer (num_hidden_layers = "
                         f"{num_layers}), got length {len(pattern)}")
    if not pattern:
        raise ValueError(f"{name}: expected one character per layer, got an empty string")
    bad = next(((i, c) for i, c in enumerate(pattern) if c not in "FS"), None)
    if bad is not None:
        raise ValueError(f"{name}: expected only 'F' and 'S', got {bad[1]!r} at position {bad[0]}")
    if pattern[0] != "F":
        raise ValueError(f"{name}: expected layer 0 to be 'F' (it has no layer to reuse), "
                         f"got {pattern[0]!r}")
    return pattern


def check_stage_starts(starts: Any, num_layers: int,
                       name: str = "pipeline_stage_starts") -> tuple[int, ...]:
    """First layer of each pipeline stage, strictly increasing in ``[0, num_layers)``; the
    leading 0 may be left out and is added."""
    if isinstance(starts, (str, bytes)) or not isinstance(starts, Sequence):
        raise ValueError(f"{name}: expected a sequence of ints, got {starts!r}")
    starts = tuple(check_int(f"{name}[{i}]", s, 0) for i, s in enumerate(starts))
    normalised = starts if starts and starts[0] == 0 else (0, *starts)
    if any(b <= a for a, b in zip(normalised, normalised[1:])) or normalised[-1] >= num_layers:
        raise ValueError(f"{name}: expected strictly increasing layer ids in [0, {num_layers}), "
                         f"got {starts}")
    return normalised


def check_layer_counts(num_layers: Any, num_full: Any) -> tuple[int, int]:
    """``num_layers >= 1`` layers of which ``1 <= num_full <= num_layers`` are Full."""
    num_layers = check_int("num_layers", num_layers, 1)
    num_full = check_int("num_full", num_full, 1)
    if num_full > num_layers:
        raise ValueError(f"num_full: expected an int in [1, num_layers={num_layers}], "
                         f"got {num_full}")
    return num_layers, num_full


def pattern_to_layers(pattern: str) -> list[int]:
    """The Full layers of an ``index_topk_pattern``, ascending: ``"FSSF"`` -> ``[0, 3]``."""
    check_pattern(pattern, name="pattern")
    return [layer for layer, kind in enumerate(pattern) if kind == "F"]


def layers_to_pattern(full_layers: Iterable[int], num_layers: int) -> str:
    """The ``index_topk_pattern`` of ``num_layers`` layers whose Full layers are ``full_layers``
    (any order; distinct, in range, including layer 0): ``([0, 3], 5)`` -> ``"FSSFS"``."""
    num_layers = check_int("num_layers", num_layers, 1)
    layers = [check_int("full_layers entry", layer) for layer in full_layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"full_layers: expected distinct layer ids, got {layers}")
    out_of_range = [layer for layer in layers if not 0 <= layer < num_layers]
    if out_of_range:
        raise ValueError(f"full_layers: expected ids in [0, {num_layers}), got {out_of_range}")
    if 0 not in layers:
        raise ValueError(f"full_layers: expected layer 0 (always Full), got {sorted(layers)}")
    full = set(layers)
    return "".join("F" if layer in full else "S" for layer in range(num_layers))


def uniform_pattern(num_layers: int, num_full: int) -> str:
    """``num_full`` evenly spaced Full layers out of ``num_layers``.

    Full layer ``i`` is layer ``floor(i * num_layers / num_full)`` in exact integer arithmetic, so
    layer 0 is always Full and the gaps differ by at most one:
    ``uniform_pattern(10, 4) == "FSFSSFSFSS"`` (layers 0, 2, 5, 7).
    """
    num_layers, num_full = check_layer_counts(num_layers, num_full)
    return layers_to_pattern((i * num_layers // num_full for i in range(num_full)), num_layers)
