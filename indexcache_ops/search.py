"""Choosing which layers keep their indexer: the greedy pattern search and fixed patterns.

IndexCache splits the layers of a DSA model into Full (F) layers, which run their own lightning
indexer, and Shared (S) layers, which reuse the top-k indices of the nearest preceding F layer.
A choice of layers is written as the ecosystem's ``index_topk_pattern`` string: one ``'F'`` or
``'S'`` per layer, layer 0 first, always starting with ``'F'``.

- :func:`greedy_search`: the training-free search of IndexCache (start all-F, repeatedly flip to S
  the layer whose flip gives the lowest calibration loss), resumable and rank-parallel.
- :func:`uniform_pattern`: evenly spaced F layers, the baseline a searched pattern is judged by.
- :func:`pattern_to_layers` / :func:`layers_to_pattern`: conversions between the pattern string and
  the list of F layer indices.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.distributed as dist

from .layers import (check_layer_counts, check_pattern, check_stage_starts, layers_to_pattern,
                     pattern_to_layers, uniform_pattern)

__all__ = [
    "SearchResult",
    "SearchStep",
    "greedy_search",
    "layers_to_pattern",
    "pattern_to_layers",
    "uniform_pattern",
]

_CHECKPOINT_FORMAT = "indexcache-greedy-search"
_CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class SearchStep:
    """One committed flip of :func:`greedy_search`.

    Attributes:
        step: 0-based position in the trajectory.
        flipped: the layer turned from Full to Shared.
        loss: its loss, the lowest of ``candidates``.
        pattern: the pattern after the flip.
        candidates: the loss of every candidate flip of this step, keyed by layer, ascending.
    """

    step: int
    flipped: int
    loss: float
    pattern: str
    candidates: dict[int, float]


@dataclass(frozen=True)
class SearchResult:
    """What :func:`greedy_search` found; ``dataclasses.asdict(result)`` is JSON-serialisable.

    Attributes:
        pattern: the final ``index_topk_pattern`` string (exactly ``num_full`` Full layers).
        baseline_loss: the loss of the all-Full pattern.
        steps: the trajectory, one :class:`SearchStep` per flip, in order.
    """

    pattern: str
    baseline_loss: float
    steps: list[SearchStep]

    @property
    def full_layers(self) -> list[int]:
        """Indices of the Full layers of :attr:`pattern`."""
        return pattern_to_layers(self.pattern)

    @property
    def loss(self) -> float:
        """Loss of the final pattern (the baseline when no flip was needed)."""
        return self.steps[-1].loss if self.steps else self.baseline_loss


class _Progress:
    """A progress bar over evaluations: tqdm when installed, else one rewritten stderr line."""

    def __init__(self, total: int, enabled: bool):
        self._total = total
        self._done = 0
        self._note = ""
        self._enabled = enabled
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc="greedy search", unit="eval")

    def note(self, text: str) -> None:
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int) -> None:
        if not self._enabled or n == 0:
            return
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            sys.stderr.write(f"\rgreedy search: {self._done}/{self._total} evaluations, "
                             f"{self._note}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self._done:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _write_json_atomically(path: str, obj) -> None:
    # A reader (or a restart after a crash) sees either the old or the new file, never a torn one:
    # the temp file lives in the same directory so os.replace is a same-filesystem rename.
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_checkpoint(path: str, num_layers: int) -> dict[str, float]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path!r} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a greedy_search checkpoint")
    if data.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path!r} has version {data.get('version')!r}, "
                         f"expected {_CHECKPOINT_VERSION}")
    if data.get("num_layers") != num_layers:
        raise ValueError(f"checkpoint {path!r} is for num_layers={data.get('num_layers')!r}, "
                         f"this search has num_layers={num_layers}")
    evaluations = data.get("evaluations")
    if not isinstance(evaluations, dict):
        raise ValueError(f"checkpoint {path!r} has no 'evaluations' object")
    for pattern, loss in evaluations.items():
        check_pattern(pattern, name=f"checkpoint {path!r} pattern")
        if len(pattern) != num_layers or not isinstance(loss, (int, float)):
            raise ValueError(f"checkpoint {path!r} has a bad entry {pattern!r}: {loss!r}")
    return {pattern: float(loss) for pattern, loss in evaluations.items()}


def _call(evaluate: Callable[[str], float], pattern: str) -> float:
    value = evaluate(pattern)
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"evaluate({pattern!r}) must return a float loss, got "
                        f"{type(value).__name__} {value!r}") from exc


class _Evaluations:
    """Every loss evaluated so far, identical on all ranks, mirrored in the checkpoint by rank 0."""

    def __init__(self, evaluate, num_layers: int, checkpoint, process_group, total: int,
                 progress: bool):
        self._evaluate = evaluate
        self._num_layers = num_layers
        self._group = process_group
        self.distributed = process_group is not None or (dist.is_available()
                                                         and dist.is_initialized())
        if self.distributed:
            if not dist.is_initialized():
                raise ValueError("process_group was given but torch.distributed is not initialised")
            self.rank = dist.get_rank(process_group)
            if self.rank < 0:
                raise ValueError("this process is not a member of process_group")
            self.world = dist.get_world_size(process_group)
        else:
            self.rank, self.world = 0, 1
        use_checkpoint = checkpoint is not None and self.rank == 0
        self._checkpoint = os.fspath(checkpoint) if use_checkpoint else None
        if self._checkpoint is not None:
            # Fail (or create the folder) now rather than after the first, possibly long, evaluation.
            os.makedirs(os.path.dirname(os.path.abspath(self._checkpoint)), exist_ok=True)
        self.cache = self._load()
        self.progress = _Progress(total, enabled=progress and self.rank == 0)

    def _load(self) -> dict[str, float]:
        # Rank 0 alone reads the checkpoint and broadcasts it, so the ranks agree on what is left to
        # evaluate even without a shared filesystem; a bad file raises on every rank, not only on 0.
        cache, error = {}, None
        if self._checkpoint is not None:
            try:
                cache = _load_checkpoint(self._checkpoint, self._num_layers)
            except ValueError as exc:
                if not self.distributed:
                    raise
                error = str(exc)
        if self.distributed:
            payload = [(cache, error)]
            dist.broadcast_object_list(payload, group=self._group, group_src=0)
            cache, error = payload[0]
            if error is not None:
                raise ValueError(error)
        return cache

    def _save(self) -> None:
        if self._checkpoint is not None:
            _write_json_atomically(self._checkpoint, {
                "format": _CHECKPOINT_FORMAT,
                "version": _CHECKPOINT_VERSION,
                "num_layers": self._num_layers,
                "evaluations": self.cache,
            })

    def losses(self, patterns: Sequence[str]) -> list[float]:
        """Return the loss of every pattern, evaluating the uncached ones split across the ranks."""
        todo = [p for p in patterns if p not in self.cache]
        self.progress.update(len(patterns) - len(todo))
        mine = todo[self.rank::self.world]
        new: dict[str, float] = {}
        error = None
        try:
            for pattern in mine:
                new[pattern] = self.cache[pattern] = _call(self._evaluate, pattern)
                self._save()
                self.progress.update(1)
        except Exception as exc:
            if not self.distributed:
                raise
            # Keep going into the all-gather: a rank that raised alone would leave the others
            # blocked in it forever. Every rank learns of the failure and raises below.
            error = exc
        if self.distributed:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (new, None if error is None else repr(error)),
                                   group=self._group)
            for rank_new, _ in gathered:
                self.cache.update(rank_new)
            self._save()
            if error is not None:
                raise error
            failed = [(rank, message) for rank, (_, message) in enumerate(gathered) if message]
            if failed:
                raise RuntimeError(f"greedy_search: evaluate raised on rank {failed[0][0]}: "
                                   f"{failed[0][1]}")
            self.progress.update(len(todo) - len(mine))
        return [self.cache[p] for p in patterns]


def _selection_key(loss: float) -> float:
    # A NaN loss (a diverged pattern) must lose every comparison instead of poisoning min().
    return math.inf if math.isnan(loss) else loss


def greedy_search(
    evaluate: Callable[[str], float],
    num_layers: int,
    num_full: int,
    *,
    stage_starts: Sequence[int] | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    process_group=None,
) -> SearchResult:
    """Search the F/S pattern greedily: flip to Shared, one at a time, the layer that hurts least.

    Starts from the all-Full pattern. Each step evaluates, for every layer that is still Full and
    may flip, the pattern with that one layer turned Shared, and commits the flip with the lowest
    loss; ties (and NaN losses, which count as +inf) go to the smallest layer index, so the search
    is deterministic. It stops when ``num_full`` Full layers remain, after
    ``num_layers - num_full`` steps and ``1 + sum over steps of the candidate counts`` evaluations.

    Args:
        evaluate: ``evaluate(pattern) -> loss``: the calibration LM loss of the model run with the
            given ``index_topk_pattern`` string (lower is better). Anything ``float()`` accepts
            (e.g. a one-element tensor) may be returned. It must be deterministic for resuming to
            reproduce the same trajectory.
        num_layers: number of layers, ``>= 1``.
        num_full: number of Full layers to keep, in ``[1, num_layers]``.
        stage_starts: the first layer of every pipeline stage; those layers never flip because a
            Shared layer cannot read the indices of another stage's rank. Strictly increasing layer
            indices in ``[0, num_layers)``; listing layer 0 is optional (it never flips anyway).
            ``num_full`` must be at least the number of layers that never flip.
        checkpoint: path of a JSON file holding every loss evaluated so far. Rewritten atomically
            (temp file + ``os.replace``) after every evaluation; when it exists at the start, its
            losses are reused, so a search interrupted at any point and restarted with the same
            arguments replays the same trajectory and evaluates each pattern only once in total.
            Any search over the same model and ``num_layers`` may share it (e.g. a later search
            for fewer Full layers replays the earlier one for free).
        progress: show a progress bar (tqdm when installed, else a line on stderr); rank 0 only.
        process_group: the ranks to split the evaluations across. When ``None`` and
            ``torch.distributed`` is initialised, the default group is used. Each step's uncached
            candidates, in ascending layer order, go to rank ``r`` when their position is
            ``r (mod world size)``; the losses are all-gathered so every rank commits the same
            flip and returns the same result. Only rank 0 reads and writes ``checkpoint`` (the
            other ranks' value is ignored). If ``evaluate`` raises on any rank, every rank raises
            after the current step's exchange instead of hanging.

    Returns:
        A :class:`SearchResult` with the final pattern, the all-Full baseline loss and the whole
        trajectory (every candidate's loss at every step).

    Raises:
        ValueError: bad counts, stage starts, checkpoint file or process group.
        TypeError: ``evaluate`` is not callable or returns something that is not a number.
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
    num_layers, num_full = check_layer_counts(num_layers, num_full)
    frozen = set(check_stage_starts([] if stage_starts is None else stage_starts, num_layers,
                                    name="stage_starts"))
    if num_full < len(frozen):
        raise ValueError(f"num_full={num_full} is below the {len(frozen)} layers that never flip "
                         f"(layer 0 and the stage starts {sorted(frozen)})")
    num_steps = num_layers - num_full
    flippable = num_layers - len(frozen)
    total = 1 + sum(flippable - step for step in range(num_steps))

    evaluations = _Evaluations(evaluate, num_layers, checkpoint, process_group, total, progress)
    try:
        pattern = "F" * num_layers
        evaluations.progress.note("baseline")
        (baseline_loss,) = evaluations.losses([pattern])
        steps: list[SearchStep] = []
        for step in range(num_steps):
            layers = [layer for layer in range(num_layers)
                      if pattern[layer] == "F" and layer not in frozen]
            flips = [pattern[:layer] + "S" + pattern[layer + 1:] for layer in layers]
            evaluations.progress.note(f"step {step + 1}/{num_steps}")
            candidates = dict(zip(layers, evaluations.losses(flips)))
            best = min(layers, key=lambda layer: (_selection_key(candidates[layer]), layer))
            pattern = flips[layers.index(best)]
            steps.append(SearchStep(step, best, candidates[best], pattern, candidates))
    finally:
        evaluations.progress.close()
    return SearchResult(pattern, baseline_loss, steps)
