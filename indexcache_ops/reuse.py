"""Per-layer index reuse (IndexCache): which layers run their own indexer, and the runtime that
hands each layer its top-k indices.

A DSA model splits its layers into **Full** layers, which run the lightning indexer and write top-k
indices, and **Shared** layers, which reuse the indices of the nearest preceding Full layer and need
no indexer weights, projections or indexer K cache. :class:`IndexCacheConfig` reads the split from
a checkpoint config with the field names the serving stacks use (vLLM, SGLang, TensorRT-LLM, HF
transformers); :class:`IndexCache` owns the persistent index buffers and is called once per layer.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import ops
from .layers import check_int, check_pattern, check_stage_starts
from .ops import PAGE_SIZE

__all__ = ["IndexCacheConfig", "IndexCache", "PAGE_SIZE"]

def _int_sequence(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}: expected a sequence of ints, got {value!r}")
    return tuple(check_int(f"{name}[{i}]", v, 0) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True)
class IndexCacheConfig:
    """Which layers of a DSA model run their own indexer (Full) and which reuse indices (Shared).

    Field names and meaning follow the checkpoint configs, so a model config can be passed as is
    (see :meth:`from_model_config`). Precedence: ``indexer_types`` > ``index_topk_pattern`` >
    ``index_topk_freq``; with none of them every layer is Full (plain DSA). Every field that is
    given is validated, also when a higher-precedence field overrides it, and an invalid one raises
    ``ValueError`` naming the field, what was expected and what came.

    Attributes:
        num_hidden_layers: number of main (non-MTP) decoder layers, >= 1.
        index_topk_freq: int >= 1. Layer ``L`` is Shared when
            ``max(L - index_skip_topk_offset + 1, 0) % index_topk_freq != 0``.
        index_skip_topk_offset: int >= 1, default 2 (the official patches: Full at 0, 1, 5, 9, ...
            for freq 4; GLM-5.2 uses 3: Full at 0, 1, 2, 6, ..., 74).
        index_topk_pattern: ``'F'``/``'S'`` string, one character per main layer, starting with 'F'.
        indexer_types: per-main-layer sequence of ``"full"``/``"shared"``, the first ``"full"``.
        num_nextn_predict_layers: number of MTP (next-token-prediction) layers, numbered
            ``num_hidden_layers, num_hidden_layers + 1, ...`` unless ``mtp_layer_ids`` is given.
        mtp_layer_ids: explicit MTP layer ids, each >= ``num_hidden_layers``, distinct. MTP layers
            are always Full and their own source.
        pipeline_stage_starts: first layer of each pipeline stage, strictly increasing, within
            ``[0, num_hidden_layers)``; a leading 0 is implied. Every stage must start on a Full
            layer (a Shared layer cannot read another rank's buffer). MTP layers belong to the last
            stage.
    """

    num_hidden_layers: int
    index_topk_freq: int | None = None
    index_skip_topk_offset: int = 2
    index_topk_pattern: str | None = None
    indexer_types: tuple[str, ...] | None = None
    num_nextn_predict_layers: int = 0
    mtp_layer_ids: tuple[int, ...] | None = None
    pipeline_stage_starts: tuple[int, ...] | None = None

    _pattern: str = dataclasses.field(init=False, repr=False, compare=False)
    _pattern_source: str = dataclasses.field(init=False, repr=False, compare=False)
    _sources: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _mtp: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            # Frozen: normalised and derived values are written once, here.
            object.__setattr__(self, name, value)

        n = check_int("num_hidden_layers", self.num_hidden_layers, 1)
        put("num_hidden_layers", n)
        put("index_skip_topk_offset",
            check_int("index_skip_topk_offset", self.index_skip_topk_offset, 1))
        if self.index_topk_freq is not None:
            put("index_topk_freq", check_int("index_topk_freq", self.index_topk_freq, 1))
        if self.index_topk_pattern is not None:
            check_pattern(self.index_topk_pattern, n)
        if self.indexer_types is not None:
            put("indexer_types", self._check_types(self.indexer_types, n))

        if self.indexer_types is not None:
            pattern = "".join("F" if t == "full" else "S" for t in self.indexer_types)
            source = "indexer_types"
        elif self.index_topk_pattern is not None:
            pattern, source = self.index_topk_pattern, "index_topk_pattern"
        elif self.index_topk_freq is not None:
            freq, offset = self.index_topk_freq, self.index_skip_topk_offset
            pattern = "".join("S" if max(layer - offset + 1, 0) % freq else "F"
                              for layer in range(n))
            source = "index_topk_freq"
        else:
            pattern, source = "F" * n, "default"
        put("_pattern", pattern)
        put("_pattern_source", source)
        sources, last_full = [], 0
        for layer, c in enumerate(pattern):
            if c == "F":
                last_full = layer
            sources.append(last_full)
        put("_sources", tuple(sources))

        n_mtp = check_int("num_nextn_predict_layers", self.num_nextn_predict_layers, 0)
        put("num_nextn_predict_layers", n_mtp)
        if self.mtp_layer_ids is None:
            put("_mtp", tuple(range(n, n + n_mtp)))
        else:
            ids = _int_sequence("mtp_layer_ids", self.mtp_layer_ids)
            put("mtp_layer_ids", ids)
            if any(i < n for i in ids) or len(set(ids)) != len(ids):
                raise ValueError(
                    f"mtp_layer_ids: expected distinct ids >= num_hidden_layers ({n}), got {ids}")
            if n_mtp and n_mtp != len(ids):
                raise ValueError(
                    f"mtp_layer_ids: expected num_nextn_predict_layers ({n_mtp}) ids, "
                    f"got {len(ids)}: {ids}")
            put("_mtp", tuple(sorted(ids)))

        if self.pipeline_stage_starts is not None:
            put("pipeline_stage_starts", self._check_stages(self.pipeline_stage_starts))

    @staticmethod
    def _check_types(types: Any, n: int) -> tuple[str, ...]:
        if isinstance(types, (str, bytes)) or not isinstance(types, Sequence):
            raise ValueError(
                f"indexer_types: expected a list of 'full'/'shared', got {types!r}")
        types = tuple(types)
        if len(types) != n:
            raise ValueError(
                f"indexer_types: expected one entry per layer (num_hidden_layers = {n}), "
                f"got length {len(types)}")
        bad = next(((i, t) for i, t in enumerate(types) if t not in ("full", "shared")), None)
        if bad is not None:
            raise ValueError(
                f"indexer_types: expected only 'full' and 'shared', got {bad[1]!r} at layer "
                f"{bad[0]}")
        if types[0] != "full":
            raise ValueError(
                f"indexer_types: expected layer 0 to be 'full' (it has no layer to reuse), "
                f"got {types[0]!r}")
        return types

    def _check_stages(self, starts: Any) -> tuple[int, ...]:
        starts = check_stage_starts(starts, self.num_hidden_layers)
        for stage, first in enumerate(starts):
            if self._pattern[first] != "F":
                raise ValueError(
                    f"pipeline_stage_starts: expected every stage to start on a Full layer, got "
                    f"stage {stage} starting at layer {first}, which is Shared (it would reuse "
                    f"layer {self._sources[first]}'s indices from stage {stage - 1})")
        return starts

    @classmethod
    def from_model_config(cls, cfg: Any, **overrides: Any) -> IndexCacheConfig:
        """Build from a model config: a ``Mapping`` or any object with attributes (HF
        ``PretrainedConfig``, ``types.SimpleNamespace``). Reads the field names of this class;
        missing or ``None`` entries take their defaults. ``overrides`` (any field, e.g.
        ``pipeline_stage_starts`` chosen by the serving engine) win over the config.
        """
        def get(name: str) -> Any:
            if isinstance(cfg, Mapping):
                return cfg.get(name)
            return getattr(cfg, name, None)

        kwargs = {f.name: get(f.name) for f in dataclasses.fields(cls) if f.init}
        kwargs.update(overrides)
        if kwargs["num_hidden_layers"] is None:
            raise ValueError("num_hidden_layers: expected an int >= 1 in the model config, got "
                             "nothing")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    # ---- queries -------------------------------------------------------------------------------

    @property
    def pattern(self) -> str:
        """'F'/'S' string over the main layers (MTP layers excluded; they are always Full)."""
        return self._pattern

    @property
    def pattern_source(self) -> str:
        """The field that decided the pattern: ``"indexer_types"``, ``"index_topk_pattern"``,
        ``"index_topk_freq"`` or ``"default"`` (all Full)."""
        return self._pattern_source

    def to_pattern_string(self) -> str:
        """The pattern as an ``index_topk_pattern`` value; feeding it back gives the same split."""
        return self._pattern

    def to_indexer_types(self) -> list[str]:
        """The pattern as an ``indexer_types`` value (``"full"``/``"shared"`` per main layer)."""
        return ["full" if c == "F" else "shared" for c in self._pattern]

    @property
    def full_layers(self) -> tuple[int, ...]:
        """Main layers that run their own indexer, ascending (MTP layers are in
        :attr:`mtp_layers`)."""
        return tuple(i for i, c in enumerate(self._pattern) if c == "F")

    @property
    def shared_layers(self) -> tuple[int, ...]:
        """Main layers that reuse a preceding Full layer's indices, ascending."""
        return tuple(i for i, c in enumerate(self._pattern) if c == "S")

    @property
    def num_full(self) -> int:
        """Number of Full main layers (``pattern.count('F')``)."""
        return self._pattern.count("F")

    @property
    def num_shared(self) -> int:
        """Number of Shared main layers."""
        return self.num_hidden_layers - self.num_full

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """MTP layer ids, ascending; each is Full and its own source."""
        return self._mtp

    @property
    def indexer_layers(self) -> tuple[int, ...]:
        """Every layer that needs an indexer and an indexer K cache: Full main layers, then MTP."""
        return self.full_layers + self._mtp

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer id: ``0 .. num_hidden_layers - 1``, then the MTP layers."""
        return tuple(range(self.num_hidden_layers)) + self._mtp

    def _check_layer(self, layer: Any) -> int:
        if (isinstance(layer, numbers.Integral) and not isinstance(layer, bool)
                and (0 <= layer < self.num_hidden_layers or layer in self._mtp)):
            return int(layer)
        raise ValueError(
            f"layer: expected an id in [0, {self.num_hidden_layers}) or an MTP layer "
            f"{self._mtp}, got {layer!r}")

    def is_full(self, layer: int) -> bool:
        """Whether ``layer`` runs its own indexer (always true for layer 0 and MTP layers)."""
        layer = self._check_layer(layer)
        return layer >= self.num_hidden_layers or self._pattern[layer] == "F"

    def source_layer(self, layer: int) -> int:
        """The layer whose indices ``layer`` uses: itself when Full (MTP included), else the
        nearest preceding Full layer."""
        layer = self._check_layer(layer)
        return layer if layer >= self.num_hidden_layers else self._sources[layer]

    def needs_indexer(self, layer: int) -> bool:
        """Whether ``layer`` needs indexer weights and projections (wq_b, wk, k_norm, weights_proj
        in DeepSeek-V3.2 naming). Shared layers need none."""
        return self.is_full(layer)

    def needs_indexer_k_cache(self, layer: int) -> bool:
        """Whether ``layer`` needs a paged indexer K cache; a framework can skip allocating it for
        the others."""
        return self.is_full(layer)

    def indexer_k_cache_bytes_saved(self, context_len: int | None = None,
                                    num_blocks: int | None = None, head_dim: int = 128) -> int:
        """Bytes of paged FP8 indexer K cache not allocated because Shared layers need none.

        One 64-token page holds ``64 * (head_dim + 4)`` bytes (per token head_dim e4m3 values and
        one fp32 scale). Pass exactly one of ``num_blocks`` (pages per layer) or ``context_len``
        (tokens per layer, rounded up to whole pages). Returns
        ``num_shared * pages * 64 * (head_dim + 4)``.
        """
        if (context_len is None) == (num_blocks is None):
            raise ValueError(
                f"indexer_k_cache_bytes_saved: expected exactly one of context_len and "
                f"num_blocks, got context_len={context_len!r}, num_blocks={num_blocks!r}")
        head_dim = check_int("head_dim", head_dim, 1)
        if num_blocks is not None:
            pages = check_int("num_blocks", num_blocks, 0)
        else:
            pages = math.ceil(check_int("context_len", context_len, 0) / PAGE_SIZE)
        return self.num_shared * pages * PAGE_SIZE * (head_dim + 4)

    # ---- pipeline stages -----------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages (1 without ``pipeline_stage_starts``)."""
        return 1 if self.pipeline_stage_starts is None else len(self.pipeline_stage_starts)

    def stage_layers(self, stage: int) -> tuple[int, ...]:
        """Layer ids of pipeline stage ``stage``; the last stage also holds the MTP layers."""
        stage = check_int("stage", stage, 0)
        if stage >= self.num_stages:
            raise ValueError(f"stage: expected an int in [0, {self.num_stages}), got {stage}")
        starts = self.pipeline_stage_starts or (0,)
        ends = starts[1:] + (self.num_hidden_layers,)
        mtp = self._mtp if stage == self.num_stages - 1 else ()
        return tuple(range(starts[stage], ends[stage])) + mtp

    def stage_of(self, layer: int) -> int:
        """The pipeline stage holding ``layer`` (MTP layers: the last stage)."""
        layer = self._check_layer(layer)
        if layer >= self.num_hidden_layers:
            return self.num_stages - 1
        return sum(1 for start in (self.pipeline_stage_starts or (0,)) if start <= layer) - 1


class IndexCache:
    """Persistent top-k index buffers and the per-layer entry points a DSA model calls.

    One int32 buffer ``[capacity, topk]`` per layer that runs an indexer (Full main layers and MTP
    layers, restricted to one pipeline stage if ``stage`` is given), allocated once at
    construction and filled with -1. Full layers write their indices into their buffer through
    ``out=``; Shared layers return the view their source layer returned, the same storage. Nothing
    is allocated per call and every result is a narrowing of a persistent buffer, so a decode step
    can be captured in a CUDA graph and a layer loop compiled with ``torch.compile``.

    Layers of one step must be called in model order, each Shared layer after its source. A new
    step is detected when a layer id lower than the previous call's comes in (the layer loop
    restarted); :meth:`begin_step` marks one explicitly. A Shared layer whose source has not run
    (for the same entry point) since the step began raises ``RuntimeError``. The bookkeeping is
    plain Python state and never synchronises the device; under ``torch.compile`` it is traced
    with the rest and guards only on the last layer id seen, the same at the start of every step.
    Layers executing concurrently on two micro-batches (two-batch overlap) need one
    ``IndexCache`` each.

    Memory: ``buffers * capacity * topk * 4`` bytes (:attr:`nbytes`). By default every indexer
    layer owns a buffer, so each layer's indices stay readable after the step. With
    ``share_buffers=True`` (what a serving engine wants: vLLM and SGLang keep one top-k buffer for
    all layers) a buffer serves every indexer layer whose indices are dead by the time the next
    one writes: a layer's indices live from its own call to its last Shared layer's, and the
    fewest buffers that keep overlapping lifetimes apart are allocated (one, with this module's
    rule: a Shared layer reuses the nearest preceding Full layer, so lifetimes never overlap).
    A layer's results are then valid until its last Shared layer has run; later Full layers may
    overwrite them.

    Args:
        config: the layer split.
        max_tokens: most query rows of one prefill call (plus ``row_offset``), >= 1.
        topk: indices per query row, >= 1.
        device: where the buffers live; default ``torch.get_default_device()``.
        max_batch: most sequences of one decode call; with ``max_next_n`` the decode rows
            ``max_batch * max_next_n`` are provisioned too. Without it decode calls share the
            ``max_tokens`` rows.
        max_next_n: most MTP query rows per sequence of one decode call (default 1).
        stage: allocate only for the layers of this pipeline stage (see
            :meth:`IndexCacheConfig.stage_layers`); calls for other layers raise.
        share_buffers: let indexer layers with disjoint index lifetimes share a buffer (above).
    """

    def __init__(self, config: IndexCacheConfig, max_tokens: int, topk: int = 2048,
                 device: torch.device | str | None = None, max_batch: int | None = None,
                 max_next_n: int | None = None, stage: int | None = None,
                 share_buffers: bool = False) -> None:
        if not isinstance(config, IndexCacheConfig):
            raise ValueError(
                f"config: expected an IndexCacheConfig, got {type(config).__name__}")
        self.config = config
        self.max_tokens = check_int("max_tokens", max_tokens, 1)
        self.topk = check_int("topk", topk, 1)
        self.max_batch = None if max_batch is None else check_int("max_batch", max_batch, 1)
        self.max_next_n = None if max_next_n is None else check_int("max_next_n", max_next_n, 1)
        decode_rows = self.max_batch * (self.max_next_n or 1) if self.max_batch else 0
        self.capacity = max(self.max_tokens, decode_rows)
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.stage = None if stage is None else check_int("stage", stage, 0)
        self.layers = config.layers if stage is None else config.stage_layers(stage)
        if not isinstance(share_buffers, bool):
            raise ValueError(f"share_buffers: expected a bool, got {share_buffers!r}")
        self.share_buffers = share_buffers
        self._buffers = self._allocate()
        # (entry point, source layer) -> (result view, row_offset) written in the current step.
        self._results: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}
        self._last_layer = -1

    def _allocate(self) -> dict[int, torch.Tensor]:
        """One buffer per indexer layer, or with share_buffers the interval-partitioning of their
        lifetimes [layer, last layer reusing it]: owners in ascending order each take the first
        buffer whose previous owner's lifetime ended before them, which uses as many buffers as
        lifetimes overlap at most (the optimum for intervals)."""
        def new() -> torch.Tensor:
            return torch.full((self.capacity, self.topk), -1, dtype=torch.int32,
                              device=self.device)

        owners = [layer for layer in self.layers if self.config.is_full(layer)]
        if not self.share_buffers:
            return {layer: new() for layer in owners}
        last_use = {layer: layer for layer in owners}
        for layer in self.layers:
            source = self.config.source_layer(layer)
            if source in last_use:
                last_use[source] = max(last_use[source], layer)
        pool: list[torch.Tensor] = []
        free_after: list[int] = []  # free_after[i]: last use of buffer i's latest owner
        assigned = {}
        for layer in sorted(owners):
            i = next((i for i, end in enumerate(free_after) if end < layer), len(pool))
            if i == len(pool):
                pool.append(new())
                free_after.append(-1)
            assigned[layer] = pool[i]
            free_after[i] = last_use[layer]
        return assigned

    @property
    def nbytes(self) -> int:
        """Total bytes of the persistent index buffers (shared ones counted once)."""
        unique = {b.data_ptr(): b for b in self._buffers.values()}
        return sum(b.numel() * b.element_size() for b in unique.values())

    def buffer(self, layer: int) -> torch.Tensor:
        """The persistent int32 ``[capacity, topk]`` buffer holding ``layer``'s indices (its source
        layer's buffer for a Shared layer). Its storage never changes."""
        return self._buffers[self.config.source_layer(self._check_layer(layer))]

    def begin_step(self) -> None:
        """Start a new step: Shared layers may read only what Full layers write after this.
        Optional when each step calls the layers in ascending order."""
        self._results = {}
        self._last_layer = -1

    def _check_layer(self, layer: Any) -> int:
        layer = self.config._check_layer(layer)
        if self.stage is not None and layer not in self.layers:
            raise ValueError(
                f"layer: expected a layer of pipeline stage {self.stage} {self.layers}, got "
                f"{layer}")
        return layer

    def _enter(self, layer: Any) -> tuple[int, int]:
        layer = self._check_layer(layer)
        if layer < self._last_layer:
            self._results = {}
        self._last_layer = layer
        return layer, self.config.source_layer(layer)

    def _shared(self, kind: str, layer: int, source: int, row_offset: int) -> torch.Tensor:
        hit = self._results.get((kind, source))
        if hit is None:
            raise RuntimeError(
                f"IndexCache.{kind}: layer {layer} is Shared and reuses layer {source}'s indices, "
                f"but layer {source} has not run {kind} in this step; call the layers in order")
        view, offset = hit
        if offset != row_offset:
            raise ValueError(
                f"IndexCache.{kind}: row_offset: expected {offset} (what source layer {source} "
                f"wrote at) for Shared layer {layer}, got {row_offset}")
        return view

    def _rows(self, kind: str, layer: int, row_offset: Any, rows: int) -> torch.Tensor:
        row_offset = check_int("row_offset", row_offset, 0)
        if row_offset + rows > self.capacity:
            raise ValueError(
                f"IndexCache.{kind}: expected row_offset + rows <= capacity {self.capacity} "
                f"(max_tokens={self.max_tokens}, max_batch={self.max_batch}, "
                f"max_next_n={self.max_next_n}), got row_offset {row_offset} + {rows} rows")
        return self._buffers[layer].narrow(0, row_offset, rows)

    @staticmethod
    def _require(kind: str, layer: int, **inputs: Any) -> None:
        missing = [name for name, value in inputs.items() if value is None]
        if missing:
            raise ValueError(
                f"IndexCache.{kind}: layer {layer} is Full and needs its indexer inputs, got None "
                f"for {', '.join(missing)}")

    def prefill(self, layer: int, q_fp8: torch.Tensor | None = None,
                k_fp8: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, ks: torch.Tensor | None = None,
                ke: torch.Tensor | None = None, *, row_offset: int = 0) -> torch.Tensor:
        """Top-k key indices of one layer for S query rows (prefill / extend).

        Full layer: ``ops.indexer_topk`` into rows ``[row_offset, row_offset + S)`` of the layer's
        buffer. Shared layer: the view its source layer returned in this step; the indexer inputs
        are not read and may be None.

        Args:
            layer: layer id.
            q_fp8: ``[S, H, D]`` float8_e4m3fn indexer queries.
            k_fp8: ``[N, D]`` float8_e4m3fn indexer keys.
            k_scale: ``[N]`` float32 per-key scales.
            weights: ``[S, H]`` float32 head weights (q scale and constants folded in).
            ks, ke: ``[S]`` int32 visible key window ``[ks[t], ke[t])`` per query row.
            row_offset: first buffer row to write (a mixed step writes decode rows first, then
                prefill rows after them); a Shared layer must pass its source's.

        Returns:
            int32 ``[S, topk]`` key indices, -1 padded, a view of a persistent buffer.
        """
        layer, source = self._enter(layer)
        if source != layer:
            return self._shared("prefill", layer, source, row_offset)
        self._require("prefill", layer, q_fp8=q_fp8, k_fp8=k_fp8, k_scale=k_scale,
                      weights=weights, ks=ks, ke=ke)
        if q_fp8.dim() != 3:
            raise ValueError(
                f"IndexCache.prefill: q_fp8: expected [S, H, D], got shape {tuple(q_fp8.shape)}")
        out = self._rows("prefill", layer, row_offset, q_fp8.shape[0])
        ops.indexer_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, self.topk, out=out)
        self._results[("prefill", layer)] = (out, row_offset)
        return out

    def decode(self, layer: int, q_fp8: torch.Tensor | None = None,
               kv_cache: torch.Tensor | None = None, weights: torch.Tensor | None = None,
               context_lens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
               max_context_len: int | None = None, *, row_offset: int = 0) -> torch.Tensor:
        """Top-k positions of one layer for B sequences with next_n query rows each (decode, MTP).

        Full layer: ``ops.indexer_topk_paged`` into rows ``[row_offset, row_offset + B * next_n)``
        of the layer's buffer. Shared layer: the view its source layer returned in this step; the
        indexer inputs are not read and may be None.

        Args:
            layer: layer id.
            q_fp8: ``[B, next_n, H, D]`` float8_e4m3fn indexer queries.
            kv_cache: ``[num_pages, 64, 1, D + 4]`` uint8 paged indexer K cache of this layer.
            weights: ``[B * next_n, H]`` float32 head weights.
            context_lens: ``[B]`` int32 sequence lengths (including the next_n new tokens).
            block_table: ``[B, max_pages]`` int32 page ids per sequence.
            max_context_len: int, upper bound of ``context_lens``.
            row_offset: first buffer row to write; a Shared layer must pass its source's.

        Returns:
            int32 ``[B * next_n, topk]`` positions, -1 padded, a view of a persistent buffer.
        """
        layer, source = self._enter(layer)
        if source != layer:
            return self._shared("decode", layer, source, row_offset)
        self._require("decode", layer, q_fp8=q_fp8, kv_cache=kv_cache, weights=weights,
                      context_lens=context_lens, block_table=block_table,
                      max_context_len=max_context_len)
        if q_fp8.dim() != 4:
            raise ValueError(
                f"IndexCache.decode: q_fp8: expected [B, next_n, H, D], got shape "
                f"{tuple(q_fp8.shape)}")
        batch, next_n = q_fp8.shape[0], q_fp8.shape[1]
        if self.max_batch is not None and batch > self.max_batch:
            raise ValueError(
                f"IndexCache.decode: expected batch <= max_batch {self.max_batch}, got {batch}")
        if self.max_next_n is not None and next_n > self.max_next_n:
            raise ValueError(
                f"IndexCache.decode: expected next_n <= max_next_n {self.max_next_n}, "
                f"got {next_n}")
        out = self._rows("decode", layer, row_offset, batch * next_n)
        ops.indexer_topk_paged(q_fp8, kv_cache, weights, context_lens, block_table,
                               max_context_len, self.topk, out=out)
        self._results[("decode", layer)] = (out, row_offset)
        return out
