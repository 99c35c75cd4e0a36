"""Shared benchmark machinery for every op family (DESIGN §5 counting rules, §7 results format).

- counters: FLOPs and bytes of one call, one function per DESIGN §5 rule, so every bench counts alike;
- time_fn: CUDA-event timing (or CUDA-graph replay for small launches) over rotating input sets
  that keep L2 cold; time.perf_counter on a machine without CUDA;
- measure_ceilings: the copy / bf16 / fp8 ceilings of this machine, measured in the same run,
  because they move between runs (DESIGN §5);
- Case, run_family, main: the loop every bench_<family>.py shares, the JSON writer and the tables.

On a machine without CUDA everything runs in a labelled CPU fallback (tiny shapes, device "cpu",
ceilings null) so that the benchmark command does something useful anywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "results"

# Tokens per page of every paged cache (DeepGEMM's and FlashMLA's layouts).
PAGE_SIZE = 64
# MLA absorbed form: 512 latent (also V) + 64 rope; FP8 cache row = 512 e4m3 + 4 f32 scales + 64 bf16.
MLA_DIM_QK = 576
MLA_DIM_V = 512
MLA_FP8_ROW_BYTES = 656
MLA_BF16_ROW_BYTES = MLA_DIM_QK * 2

# Torch baselines process their work in chunks whose temporaries stay under this many bytes, so a
# baseline never materialises e.g. the 9.6 GB gathered KV of a full sparse-MLA prefill at once.
WORKSPACE_BYTES = 1 << 30
# Input rotation never allocates more sets than this (a 1-row top-k needs ~200 to exceed 2x L2).
MAX_SETS = 1024
# Auto mode replays a CUDA graph when one eager call takes less than this: below it the launch
# gap between back-to-back calls is a visible part of what per-call events would measure.
GRAPH_BELOW_S = 100e-6
# One graph replay spans at least this long so the event resolution (~0.5 us) stays negligible.
GRAPH_MIN_REPLAY_S = 1e-3
MAX_GRAPH_CALLS = 4096
# Timed calls per measurement: at least MIN_REPS for a usable median, at most MAX_REPS.
MIN_REPS = 5
MAX_REPS = 2000


# ---------------------------------------------------------------------------------------------
# Counters (DESIGN §5). Every function returns an exact integer count for one call.
# ---------------------------------------------------------------------------------------------

def _ints(values: Iterable[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).cpu().reshape(-1)


def causal_tail_ends(S: int, N: int) -> torch.Tensor:
    """ke of the causal-tail windows: query t of the last S tokens of N sees [0, N - S + t + 1)."""
    return torch.arange(N - S + 1, N + 1, dtype=torch.int32)


def window_pairs(ks: Iterable[int] | torch.Tensor, ke: Iterable[int] | torch.Tensor, N: int) -> int:
    """Visible (query, key) pairs of windows [ks, ke) clipped to [0, N)."""
    lo = _ints(ks).clamp(0, N)
    hi = _ints(ke).clamp(0, N)
    return int((hi - lo).clamp_min(0).sum())


def paged_pairs(context_lens: Iterable[int] | torch.Tensor, next_n: int) -> int:
    """Visible pairs of the paged form: row (b, j) sees [0, len_b - next_n + j + 1)."""
    lens = _ints(context_lens)
    visible = lens[:, None] - next_n + torch.arange(1, next_n + 1)[None, :]
    return int(visible.clamp_min(0).sum())


def indexer_flops(heads: int, head_dim: int, pairs: int) -> int:
    """Indexer FLOPs: 2·H·D per visible (query, key) pair."""
    return 2 * heads * head_dim * pairs


def indexer_paged_bytes(context_lens: Iterable[int] | torch.Tensor, next_n: int, heads: int,
                        head_dim: int, out_bytes: int) -> int:
    """Paged indexer decode bytes: q (e4m3) + every visible cache byte (D + 4 per token, the
    longest row of a sequence sees all len_b tokens) + weights (f32) + the output written."""
    lens = _ints(context_lens)
    rows = lens.numel() * next_n
    return rows * heads * head_dim + int(lens.sum()) * (head_dim + 4) + rows * heads * 4 + out_bytes


def topk_bytes(row_lengths: Iterable[int] | torch.Tensor) -> int:
    """Top-k bytes: 4·Σ row lengths, one read of the f32 logits."""
    return 4 * int(_ints(row_lengths).sum())


def sparse_mla_flops(queries: int, heads: int, topk: int) -> int:
    """Sparse MLA FLOPs: 2·Hq·k·(576 + 512) per query (QK^T over 576, PV over 512)."""
    return queries * 2 * heads * topk * (MLA_DIM_QK + MLA_DIM_V)


def sparse_mla_decode_bytes(queries: int, heads: int, topk: int, kv_row_bytes: int,
                            d_v: int = MLA_DIM_V) -> int:
    """Decode bytes: every byte of q (bf16), gathered KV rows, indices (i32) and the outputs
    (out bf16 and lse f32) moved once."""
    q = queries * heads * MLA_DIM_QK * 2
    kv = queries * topk * kv_row_bytes
    indices = queries * topk * 4
    out = queries * heads * (d_v * 2 + 4)
    return q + kv + indices + out


# ---------------------------------------------------------------------------------------------
# Machine and input helpers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    device: str          # DESIGN §7 "device": the GPU's name, or "cpu" in the fallback
    cuda: bool
    l2_bytes: int        # 0 on CPU: no rotation there
    slug: str            # file-name tag, so a CPU run never overwrites an H100 result

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")


def detect_machine() -> Machine:
    if not torch.cuda.is_available():
        return Machine(device="cpu", cuda=False, l2_bytes=0, slug="cpu")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    slug = "".join(c if c.isalnum() else "-" for c in props.name.lower().replace("nvidia", ""))
    return Machine(device=props.name, cuda=True, l2_bytes=int(props.L2_cache_size),
                   slug="-".join(p for p in slug.split("-") if p))


def tensor_bytes(inputs: Any) -> int:
    """Bytes of the tensors held by one input set (a SimpleNamespace or a mapping)."""
    values = inputs.values() if isinstance(inputs, Mapping) else vars(inputs).values()
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def sets_needed(touched_bytes: int, l2_bytes: int, max_sets: int = MAX_SETS) -> int:
    """Input sets whose combined footprint exceeds 2x L2, or 1 when one call already touches
    more than L2 (or there is no L2 to defeat, on CPU)."""
    if l2_bytes <= 0 or touched_bytes > l2_bytes:
        return 1
    return min(max_sets, 2 * l2_bytes // max(touched_bytes, 1) + 1)


class DoesNotFit(RuntimeError):
    """The input sets of a shape would not fit in free device memory."""


def rotating_sets(make_inputs: Callable[[], Any], machine: Machine,
                  touched_bytes: int | None = None) -> list[Any]:
    """Build enough input sets for an L2-cold rotation. touched_bytes is what one call reads and
    writes (default: every tensor of the set); it decides the count, while the allocated size
    decides whether the sets fit."""
    first = make_inputs()
    allocated = tensor_bytes(first)
    count = sets_needed(allocated if touched_bytes is None else touched_bytes, machine.l2_bytes)
    if machine.cuda and count > 1:
        free = torch.cuda.mem_get_info()[0]
        need = (count - 1) * allocated
        if need > 0.8 * free:
            raise DoesNotFit(f"{count} input sets need {need / 2**30:.1f} GiB more, "
                             f"{free / 2**30:.1f} GiB free")
    return [first] + [make_inputs() for _ in range(count - 1)]


def chunk_ranges(total: int, bytes_per_item: int):
    """[start, end) ranges over `total` items whose temporaries stay under WORKSPACE_BYTES."""
    step = max(1, WORKSPACE_BYTES // max(bytes_per_item, 1))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def fill_e4m3_(t: torch.Tensor) -> torch.Tensor:
    """Fill an e4m3 tensor (or a strided view of one) with N(0, 1) values. torch cannot draw e4m3
    directly, so bf16 draws are converted in slices along dim 0 to bound the temporary."""
    step = max(1, (WORKSPACE_BYTES // 2) // max(1, t[0].numel()))
    for start in range(0, t.shape[0], step):
        part = t[start:start + step]
        part.copy_(torch.randn(part.shape, dtype=torch.bfloat16, device=t.device))
    return t


def random_e4m3(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return fill_e4m3_(torch.empty(tuple(shape), dtype=torch.float8_e4m3fn, device=device))


def paged_block_table(batch: int, context: int, device: torch.device) -> torch.Tensor:
    """[batch, context/64] int32 block table over batch*context/64 pages in random order, so a
    sequence's pages are scattered through the cache as they are in a serving engine."""
    per_seq = -(-context // PAGE_SIZE)
    return torch.randperm(batch * per_seq, device=device).view(batch, per_seq).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    p90_s: float
    reps: int
    sets: int
    graph: bool
    note: str = ""


def _timing(samples: list[float], sets: int, graph: bool, note: str = "") -> Timing:
    ordered = sorted(samples)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]   # nearest rank
    return Timing(statistics.median(ordered), ordered[0], p90, len(ordered), sets, graph, note)


def _reps_for(budget_s: float, per_rep_s: float) -> int:
    return int(min(MAX_REPS, max(MIN_REPS, budget_s / max(per_rep_s, 1e-9))))


def _time_cpu(fn, sets, warmup, reps, budget_s) -> Timing:
    n = len(sets)
    start = time.perf_counter()
    for i in range(warmup):
        fn(sets[i % n])
    reps = reps or _reps_for(budget_s, (time.perf_counter() - start) / warmup)
    samples = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(sets[i % n])
        samples.append(time.perf_counter() - t0)
    return _timing(samples, n, graph=False)


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _time_cuda_eager(fn, sets, reps) -> list[float]:
    """One event pair around each call of a back-to-back loop (the 'sustained' median)."""
    n = len(sets)
    starts = [_event() for _ in range(reps)]
    ends = [_event() for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(sets[i % n])
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def _time_cuda_graph(fn, sets, est_s, reps, budget_s) -> list[float]:
    """Capture one pass of many calls (rotating through the sets) and time its replays; a call's
    time is a replay's over its call count, launch gaps excluded."""
    n = len(sets)
    calls = min(MAX_GRAPH_CALLS, max(n, math.ceil(GRAPH_MIN_REPLAY_S / max(est_s, 1e-9))))
    side = torch.cuda.Stream()   # warm-up on a side stream before capture, as torch requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(sets[i % n])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(sets[i % n])
    graph.replay()
    torch.cuda.synchronize()
    replays = reps or _reps_for(budget_s, est_s * calls)
    starts = [_event() for _ in range(replays)]
    ends = [_event() for _ in range(replays)]
    for i in range(replays):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 / calls for s, e in zip(starts, ends)]


def time_fn(fn: Callable[[Any], object], inputs: Sequence[Any] | Callable[[], Any], *,
            warmup: int | None = None, reps: int | None = None, graph: bool | None = None,
            budget_s: float = 1.0, machine: Machine | None = None,
            touched_bytes: int | None = None) -> Timing:
    """Time fn(input_set) per call: median, min and p90 of many calls after a warm-up.

    inputs: a list of input sets used in rotation, or a zero-argument factory from which
      rotating_sets builds enough of them to keep L2 cold.
    warmup: calls before timing (default: one pass over the sets, at least 2); the calls after the
      first estimate the call time that sizes the loop.
    reps: timed calls (graph replays in graph mode); default from budget_s seconds of timing.
    graph: True: capture calls into a CUDA graph and time replays; False: events around every
      eager call; None: graph when one call takes under GRAPH_BELOW_S. A capture that fails
      (an op that synchronises, say) falls back to eager, said in Timing.note. Ignored on CPU.
    """
    machine = machine or detect_machine()
    sets = rotating_sets(inputs, machine, touched_bytes) if callable(inputs) else list(inputs)
    warmup = max(warmup if warmup is not None else len(sets), 2)
    if not machine.cuda:
        return _time_cpu(fn, sets, warmup, reps, budget_s)

    n = len(sets)
    fn(sets[0])                    # first call: module load, handle creation, allocator growth
    torch.cuda.synchronize()
    start, end = _event(), _event()
    start.record()
    for i in range(1, warmup):
        fn(sets[i % n])
    end.record()
    end.synchronize()
    est_s = start.elapsed_time(end) / 1e3 / (warmup - 1)

    if graph is None:
        graph = est_s < GRAPH_BELOW_S
    if graph:
        try:
            return _timing(_time_cuda_graph(fn, sets, est_s, reps, budget_s), n, graph=True)
        except Exception as err:  # noqa: BLE001 - any capture failure means: time it eagerly
            torch.cuda.synchronize()
            note = f"graph capture failed ({type(err).__name__}: {str(err).splitlines()[0]}), eager"
            return _timing(_time_cuda_eager(fn, sets, reps or _reps_for(budget_s, est_s)), n,
                           graph=False, note=note)
    return _timing(_time_cuda_eager(fn, sets, reps or _reps_for(budget_s, est_s)), n, graph=False)


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

COPY_BYTES = 2 << 30        # per buffer: far beyond L2, so the copy streams from and to HBM
MATMUL_N = 8192
CEILING_SUSTAIN_S = 2.0     # long enough for compute-bound loops to reach the power cap


@dataclass(frozen=True)
class Ceilings:
    """Sustained values (median of a back-to-back loop) go into the JSON and into
    pct_of_ceiling, like the kernels' own medians; burst values (best call) are printed."""
    copy_tbps: float | None = None
    bf16_tflops: float | None = None
    fp8_tflops: float | None = None
    copy_burst_tbps: float | None = None
    bf16_burst_tflops: float | None = None
    fp8_burst_tflops: float | None = None

    def as_json(self) -> dict:
        return {"copy_tbps": self.copy_tbps, "bf16_tflops": self.bf16_tflops,
                "fp8_tflops": self.fp8_tflops}

    def matmul(self, peak: str | None) -> float | None:
        return {"fp8": self.fp8_tflops, "bf16": self.bf16_tflops}.get(peak or "")

    def describe(self) -> str:
        if self.copy_tbps is None and self.bf16_tflops is None and self.fp8_tflops is None:
            return "ceilings: not measured"
        pair = lambda a, b: "-" if a is None else f"{a:.4g} / {b:.4g}"
        return (f"ceilings (sustained / burst): copy {pair(self.copy_tbps, self.copy_burst_tbps)}"
                f" TB/s, bf16 mm {pair(self.bf16_tflops, self.bf16_burst_tflops)} TFLOP/s, "
                f"fp8 mm {pair(self.fp8_tflops, self.fp8_burst_tflops)} TFLOP/s")


def measure_ceilings(machine: Machine, sustain_s: float = CEILING_SUSTAIN_S) -> Ceilings:
    """Device-to-device copy (bytes read + written), bf16 and fp8 e4m3 8192^3 matmuls on random
    data (zeros run faster than real data); null on CPU. A ceiling that cannot be measured is
    null with a printed reason, so the kernels' rows are still timed."""
    if not machine.cuda:
        return Ceilings()
    dev = machine.torch_device
    n = MATMUL_N

    def copy_inputs():
        src = torch.rand(COPY_BYTES // 4, device=dev)
        return src, torch.empty_like(src)

    def bf16_inputs():
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        return a, b, torch.empty_like(a)

    def fp8_inputs():
        # _scaled_mm wants A row-major and B column-major: B is the transpose of a row-major [N, K]
        one = torch.ones((), device=dev, dtype=torch.float32)
        return random_e4m3((n, n), dev), random_e4m3((n, n), dev).t(), one

    def measure(amount: int, fn, make) -> tuple[float | None, float | None]:
        try:
            t = time_fn(fn, [make()], warmup=5, graph=False, budget_s=sustain_s, machine=machine)
            return _sig(amount / t.median_s / 1e12), _sig(amount / t.min_s / 1e12)
        except Exception as err:  # noqa: BLE001 - a missing ceiling must not cost the whole run
            print(f"ceiling not measured: {type(err).__name__}: {err}", flush=True)
            return None, None
        finally:
            torch.cuda.empty_cache()

    copy = measure(2 * COPY_BYTES, lambda x: x[1].copy_(x[0]), copy_inputs)
    bf16 = measure(2 * n ** 3, lambda x: torch.mm(x[0], x[1], out=x[2]), bf16_inputs)
    fp8 = measure(2 * n ** 3, lambda x: torch._scaled_mm(
        x[0], x[1], scale_a=x[2], scale_b=x[2], out_dtype=torch.bfloat16), fp8_inputs)
    return Ceilings(copy[0], bf16[0], fp8[0], copy[1], bf16[1], fp8[1])


# ---------------------------------------------------------------------------------------------
# Results (DESIGN §7)
# ---------------------------------------------------------------------------------------------

def _sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def current_commit() -> str:
    """INDEXCACHE_COMMIT when set (the device machine gets a copy of the tree without .git), else
    `git rev-parse --short HEAD` plus "-dirty" when tracked files differ, else "unknown"."""
    if os.environ.get("INDEXCACHE_COMMIT"):
        return os.environ["INDEXCACHE_COMMIT"]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_row(op: str, impl: str, shape: dict, time_s: float, flops: int | None,
             nbytes: int | None, peak: str | None, ceilings: Ceilings) -> dict:
    """One DESIGN §7 row. tflops / tbps are given only where DESIGN §5 defines the count for the
    op. pct_of_ceiling is the roofline fraction: the larger of TFLOP/s over the op's matmul
    ceiling (fp8 or bf16) and TB/s over the copy ceiling; null without measured ceilings."""
    tflops = flops / time_s / 1e12 if flops is not None else None
    tbps = nbytes / time_s / 1e12 if nbytes is not None else None
    fractions = []
    if tflops is not None and ceilings.matmul(peak):
        fractions.append(tflops / ceilings.matmul(peak))
    if tbps is not None and ceilings.copy_tbps:
        fractions.append(tbps / ceilings.copy_tbps)
    return {"op": op, "impl": impl, "shape": dict(shape), "time_us": _sig(time_s * 1e6, 6),
            "tflops": _sig(tflops), "tbps": _sig(tbps),
            "pct_of_ceiling": _sig(100 * max(fractions), 3) if fractions else None}


def results_document(machine: Machine, ceilings: Ceilings, commit: str, rows: list[dict]) -> dict:
    return {"device": machine.device,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "ceilings": ceilings.as_json(), "rows": rows}


def write_results(document: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Cases and the shared bench loop
# ---------------------------------------------------------------------------------------------

@dataclass
class Impl:
    name: str                          # DESIGN §7 impl: "indexcache", "torch", a peer's name
    fn: Callable[[Any], object]        # called with one input set


@dataclass
class Case:
    """One op at one shape, with every implementation that computes it."""
    op: str
    shape: dict
    make_inputs: Callable[[], Any]     # builds one input set (a SimpleNamespace of tensors)
    impls: list[Impl]
    flops: int | None = None           # DESIGN §5 counts of one call; None where undefined
    nbytes: int | None = None
    peak: str | None = None            # "fp8" / "bf16": the matmul ceiling the FLOPs compare with
    touched_bytes: int | None = None   # what one call touches, sizing the rotation (default: set)
    headline: bool = False             # one of the DESIGN/issue headline shapes
    reference: str = "torch"           # the impl the summary's speed-up column divides by


@dataclass
class Record:
    case: Case
    impl: str
    status: str                        # "ok", "skipped" or "failed"
    row: dict | None = None
    timing: Timing | None = None
    reason: str = ""


class OpsUnavailable(NotImplementedError):
    """indexcache_ops.ops could not be imported: every indexcache row is skipped with why."""


class UnavailableOps:
    def __init__(self, reason: str):
        self.reason = reason

    def __getattr__(self, name: str):
        raise OpsUnavailable(self.reason)


def load_ops() -> ModuleType | UnavailableOps:
    try:
        from indexcache_ops import ops
        return ops
    except Exception as err:  # noqa: BLE001 - ImportError, or the extension failing to load
        return UnavailableOps(f"indexcache_ops.ops not importable ({type(err).__name__}: {err})")


def optional_module(name: str) -> ModuleType | None:
    """A peer library, or None when it is not installed (the caller prints a note)."""
    try:
        return __import__(name)
    except ImportError:
        return None


@dataclass
class Context:
    """What a family's cases() needs to build its cases."""
    machine: Machine
    sweep: bool
    ops: Any

    @property
    def device(self) -> torch.device:
        return self.machine.torch_device


def _classify(err: BaseException) -> tuple[str, str]:
    first = (str(err).splitlines() or [""])[0]
    if isinstance(err, torch.OutOfMemoryError):
        return "skipped", "out of memory"
    if isinstance(err, OpsUnavailable):
        return "skipped", str(err)
    if isinstance(err, NotImplementedError) or "not implemented" in str(err).lower():
        return "skipped", f"not implemented: {first}"
    return "failed", f"{type(err).__name__}: {first}"


def format_shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_record(rec: Record) -> None:
    head = f"  {rec.case.op:<20} {rec.impl:<22} {format_shape(rec.case.shape)}"
    if rec.status != "ok":
        print(f"{head}\n      {rec.status.upper()}: {rec.reason}", flush=True)
        return
    t, r = rec.timing, rec.row
    mode = "graph" if t.graph else "eager"
    print(f"{head}\n      {r['time_us']:.2f} us (min {t.min_s * 1e6:.2f}, p90 {t.p90_s * 1e6:.2f}; "
          f"{t.reps} reps, {t.sets} set{'s' if t.sets > 1 else ''}, {mode})  "
          f"{_fmt(r['tflops'], '.1f')} TFLOP/s  {_fmt(r['tbps'], '.3f')} TB/s  "
          f"{_fmt(r['pct_of_ceiling'], '.1f')} % of ceiling"
          + (f"  [{t.note}]" if t.note else ""), flush=True)


def run_case(case: Case, impls: list[Impl], machine: Machine, ceilings: Ceilings,
             budget_s: float, graph: bool | None) -> list[Record]:
    """Time every impl of a case on the same input sets; a shape that does not fit, an op that is
    not implemented and an impl that breaks each become a printed skipped / failed record."""
    torch.manual_seed(0)
    records: list[Record] = []
    try:
        sets = rotating_sets(case.make_inputs, machine, case.touched_bytes)
    except (DoesNotFit, torch.OutOfMemoryError) as err:
        reason = f"shape does not fit: {str(err).splitlines()[0]}"
        records = [Record(case, impl.name, "skipped", reason=reason) for impl in impls]
        for rec in records:
            _print_record(rec)
    else:
        for impl in impls:
            try:
                t = time_fn(impl.fn, sets, graph=graph, budget_s=budget_s, machine=machine)
            except Exception as err:  # noqa: BLE001 - one broken row must not end the whole run
                status, reason = _classify(err)
                records.append(Record(case, impl.name, status, reason=reason))
            else:
                row = make_row(case.op, impl.name, case.shape, t.median_s, case.flops,
                               case.nbytes, case.peak, ceilings)
                records.append(Record(case, impl.name, "ok", row=row, timing=t))
            _print_record(records[-1])
        del sets
    if machine.cuda:
        torch.cuda.empty_cache()
    return records


@dataclass
class Options:
    sweep: bool = False
    out_dir: Path = DEFAULT_OUT_DIR
    ops: set[str] = field(default_factory=set)
    impls: set[str] = field(default_factory=set)
    budget_s: float = 1.0
    graph: bool | None = None


def run_family(family: ModuleType, ctx: Context, ceilings: Ceilings, commit: str,
               opts: Options) -> tuple[list[Record], Path]:
    """Run every selected case of a family and write its JSON (ok rows only: a skipped or failed
    row has no numbers, its reason is in the printout)."""
    mode = "sweep" if ctx.sweep else "headline"
    print(f"\n=== {family.FAMILY} ({mode}, {ctx.machine.device})", flush=True)
    records: list[Record] = []
    for case in family.cases(ctx):
        impls = [i for i in case.impls if not opts.impls or i.name in opts.impls]
        if (opts.ops and case.op not in opts.ops) or not impls:
            continue
        records += run_case(case, impls, ctx.machine, ceilings, opts.budget_s, opts.graph)
    rows = [r.row for r in records if r.status == "ok"]
    path = opts.out_dir / f"{family.FAMILY}-{mode}-{ctx.machine.slug}.json"
    write_results(results_document(ctx.machine, ceilings, commit, rows), path)
    print(f"  wrote {path} ({len(rows)} rows)", flush=True)
    return records, path


def _speedup(rec: Record, records: list[Record]) -> str:
    if rec.status != "ok" or rec.impl == rec.case.reference:
        return ""
    for other in records:
        if (other.status == "ok" and other.impl == rec.case.reference
                and other.case.op == rec.case.op and other.case.shape == rec.case.shape):
            return f"{other.row['time_us'] / rec.row['time_us']:.2f}x {rec.case.reference}"
    return ""


def summary_lines(records: list[Record], ceilings: Ceilings, sweep: bool) -> list[str]:
    """The short table printed last: every row of a headline run; the headline shapes of a
    sweep (its full rows are in the printout above and in the JSON)."""
    shown = [r for r in records if r.case.headline] if sweep else records
    cols = ("op", "impl", "shape", "time_us", "TFLOP/s", "TB/s", "%ceil", "speed-up")
    table = []
    for r in shown:
        if r.status == "ok":
            row = r.row
            nums = (f"{row['time_us']:.1f}", _fmt(row["tflops"], ".1f"), _fmt(row["tbps"], ".3f"),
                    _fmt(row["pct_of_ceiling"], ".1f"))
        else:
            nums = (r.status, "", "", "")
        table.append((r.case.op, r.impl, format_shape(r.case.shape), *nums,
                      _speedup(r, records)))
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "skipped", "failed")}
    out = ["=== summary", ceilings.describe(), line(cols), line("-" * w for w in widths)]
    out += [line(t) for t in table]
    out.append(f"rows: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"
               + (f" ({len(records) - len(shown)} sweep rows not shown)" if sweep else ""))
    return out


def parse_args(argv: Sequence[str] | None, family_names: Sequence[str]) -> tuple[Options, list[str]]:
    p = argparse.ArgumentParser(description="indexcache-ops benchmarks (DESIGN §5, §7)")
    p.add_argument("--sweep", action="store_true", help="all sweep shapes, not only the headline ones")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="directory for the JSON files")
    if len(family_names) > 1:
        p.add_argument("--families", default=",".join(family_names),
                       help=f"comma list among {','.join(family_names)}")
    p.add_argument("--ops", default="", help="comma list of op names to keep (default: all)")
    p.add_argument("--impls", default="", help="comma list of impl names to keep (default: all)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per row (default 1.0, 0.3 with --sweep, 0.1 on CPU)")
    p.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                   help="CUDA-graph replay: auto = for calls under 100 us")
    a = p.parse_args(argv)
    split = lambda s: {x for x in s.split(",") if x}
    budget = a.budget if a.budget is not None else (
        (0.3 if a.sweep else 1.0) if torch.cuda.is_available() else 0.1)
    opts = Options(sweep=a.sweep, out_dir=a.out, ops=split(a.ops), impls=split(a.impls),
                   budget_s=budget, graph={"auto": None, "on": True, "off": False}[a.graph])
    names = [f for f in getattr(a, "families", ",".join(family_names)).split(",") if f]
    unknown = set(names) - set(family_names)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; known: {list(family_names)}")
    return opts, names


def main(families: Sequence[ModuleType], argv: Sequence[str] | None = None) -> int:
    """Ceilings, then every selected family, then the summary table last. Exit status 1 when a
    row failed (skipped rows, e.g. ops not implemented yet, do not fail the run)."""
    by_name = {f.FAMILY: f for f in families}
    opts, names = parse_args(argv, list(by_name))
    machine = detect_machine()
    commit = current_commit()
    print(f"device: {machine.device}  torch {torch.__version__}  commit {commit}  "
          f"L2 {machine.l2_bytes / 2**20:.0f} MiB  budget {opts.budget_s} s/row", flush=True)
    if not machine.cuda:
        print("CPU FALLBACK: no CUDA device; tiny shapes, perf_counter timing, ceilings null. "
              "These numbers say nothing about the GPU kernels.", flush=True)
    ceilings = measure_ceilings(machine)
    print(ceilings.describe(), flush=True)
    ctx = Context(machine=machine, sweep=opts.sweep and machine.cuda, ops=load_ops())
    if isinstance(ctx.ops, UnavailableOps):
        print(f"note: {ctx.ops.reason}: indexcache rows are skipped", flush=True)
    records: list[Record] = []
    for name in names:
        records += run_family(by_name[name], ctx, ceilings, commit, opts)[0]
    print("\n" + "\n".join(summary_lines(records, ceilings, ctx.sweep)), flush=True)
    return 1 if any(r.status == "failed" for r in records) else 0
