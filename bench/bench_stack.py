"""DSA attention stack benchmark (issue 7): what IndexCache saves over a whole model's layer loop.

One step runs every layer of a model: the indexer (Full layers only, through IndexCache.prefill /
decode, i.e. ops.indexer_topk / ops.indexer_topk_paged into the persistent index buffers; a Shared
layer gets its source's view back and launches nothing), then sparse MLA on those indices
(ops.sparse_mla_prefill on bf16 KV, ops.sparse_mla_decode on the FP8 paged cache). Rows compare
all-Full (plain DSA) with 1/2, 1/4 and 1/8 of the indexers kept, as uniform patterns
(layers.uniform_pattern, ceil(L/f) Full layers) and GLM-5.2-style patterns
(IndexCacheConfig(index_topk_freq=f, index_skip_topk_offset=3): Full at 0, 1, 2, 2+f, ...).

Models: DeepSeek-V3.2 (61 layers; indexer H = 64, D = 128; MLA Hq = 128, k = 2048) and GLM-5
(78 layers; indexer H = 32, D = 128; MLA Hq = 64, k = 2048). GLM-5's Hq = 64 is a stand-in for
its heads per GPU under tensor parallelism, not a claim about the checkpoint's head count.
Prefill: one chunk of 8192 new queries at the end of a context of N keys (causal tail windows
ks = 0, ke = N - S + t + 1). Decode: batch {1, 32, 128}, every sequence N tokens long, next_n = 1.
Contexts: {8K, 64K, 200K} (200K = 204800); --sweep {8K, 32K, 64K, 128K, 200K}; --quick 64K only,
patterns all-Full and 1/4, decode batch {1, 128}.

Memory: one set of layer inputs serves every layer (61 layers of 200K inputs would not fit):
the kernels do not care which layer's numbers they read, only about shapes and windows. Where one
layer's work touches less than L2, the layer loop rotates through enough sets (harness
rotating_sets) that consecutive layers read different memory, as distinct layers do in a model.
One IndexCache per pattern holds the persistent index buffers of its Full layers.

Per row: the step time (the whole layer loop), its speed-up over all-Full, and the Amdahl bound
from per-op times measured in the same run on the same inputs:
  t_full = t_indexer_topk + t_attention,  t_shared = t_attention,
  bound  = L * t_full / (F * t_full + (L - F) * t_shared).
t_shared has no reuse term: a Shared layer's call is a dictionary lookup that returns a view and
launches no device work. Its host cost is measured anyway (reuse_host_us, a few us): in an eager
prefill step the GPU queue hides it, and a decode step is replayed from a CUDA graph without it.
Also reported: the indexer K cache bytes a Shared layer does not allocate, per sequence of N
tokens (IndexCacheConfig.indexer_k_cache_bytes_saved(context_len=N)).

Timing: decode steps and ops as CUDA-graph replays (harness.time_fn, graph=True), the way serving
engines run decode; prefill steps eagerly (CUDA events around each step, median of at least 3),
and its per-op times eagerly too. Output: a table, the DESIGN §7 JSON
(op dsa_stack_prefill / dsa_stack_decode, impl = pattern name, extra keys speedup, amdahl_bound,
pct_of_bound, kcache_bytes_saved, indexer_us, attention_us, reuse_host_us) and a PNG of speed-up
against context length when matplotlib is importable, both as stack-<mode>-<device>.* in --out.
Estimated H100 time of the default run ~3.5 min (prefill steps dominate: an all-Full DeepSeek
step at 200K is ~61 x 50 ms); --quick ~1 min; --sweep ~6 min (split it with --models).

Without CUDA: a labelled CPU fallback (one 4-layer model, H = 32, Hq = 16, k = 64, context 256,
64 prefill queries, decode batch {1, 2}) through the same code path.

    python -m bench.bench_stack [--quick | --sweep] [--models deepseek-v3.2,glm-5]
                                [--budget SECONDS] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import harness
from bench.bench_sparse_mla import SM_SCALE, _paged_mla_cache
from bench.harness import MLA_DIM_QK, MLA_DIM_V, PAGE_SIZE
from indexcache_ops import ops
from indexcache_ops.layers import uniform_pattern
from indexcache_ops.reuse import IndexCache, IndexCacheConfig

FAMILY = "stack"
PREFILL_OP = "dsa_stack_prefill"
DECODE_OP = "dsa_stack_decode"
REFERENCE = "all-full"


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    heads: int               # indexer heads H
    mla_heads: int           # MLA query heads Hq
    head_dim: int = 128      # indexer D
    topk: int = 2048


MODELS = (Model("deepseek-v3.2", 61, heads=64, mla_heads=128),
          Model("glm-5", 78, heads=32, mla_heads=64))
CPU_MODEL = Model("tiny-cpu", 4, heads=32, mla_heads=16, topk=64)

PREFILL_QUERIES = 8192
CONTEXTS = (8192, 65536, 204800)
SWEEP_CONTEXTS = (8192, 32768, 65536, 131072, 204800)
QUICK_CONTEXTS = (65536,)
BATCHES = (1, 32, 128)
QUICK_BATCHES = (1, 128)
RETENTIONS = (2, 4, 8)      # keep 1/f of the indexers
QUICK_RETENTIONS = (4,)
CPU_QUERIES, CPU_CONTEXTS, CPU_BATCHES = 64, (256,), (1, 2)

# Eager prefill steps: reps from the budget and the step time the per-op times predict, at
# least MIN_STEP_REPS for a median that discards one slow step.
MIN_STEP_REPS = 3
MAX_STEP_REPS = 20
REUSE_CALLS = 1000          # Shared-layer lookups averaged for reuse_host_us


# ---------------------------------------------------------------------------------------------
# Patterns and the Amdahl bound
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pattern:
    name: str                # the rows' impl
    config: IndexCacheConfig


def patterns(layers: int, retentions: Sequence[int] = RETENTIONS) -> list[Pattern]:
    """all-Full first (the reference), then per retention 1/f the uniform pattern with ceil(L/f)
    Full layers and the GLM-5.2-style one (freq f, offset 3)."""
    out = [Pattern(REFERENCE, IndexCacheConfig(num_hidden_layers=layers))]
    for f in retentions:
        uniform = uniform_pattern(layers, math.ceil(layers / f))
        out += [Pattern(f"uniform-1/{f}", IndexCacheConfig(num_hidden_layers=layers,
                                                          index_topk_pattern=uniform)),
                Pattern(f"offset3-1/{f}", IndexCacheConfig(num_hidden_layers=layers,
                                                          index_topk_freq=f,
                                                          index_skip_topk_offset=3))]
    return out


def amdahl_bound(layers: int, num_full: int, t_full_layer: float, t_shared_layer: float) -> float:
    """Best speed-up over all-Full when only the Full layers' indexer work goes away:
    L·t_full / (F·t_full + (L − F)·t_shared)."""
    return layers * t_full_layer / (num_full * t_full_layer + (layers - num_full) * t_shared_layer)


# ---------------------------------------------------------------------------------------------
# Phases: one layer's inputs, its indexer call and its attention call
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One (model, phase, context, batch): the patterns of a group share inputs and per-op times."""
    model: Model
    phase: Phase
    context: int
    batch: int
    queries: int             # rows of one step: S new tokens (prefill) or batch (decode)

    def shape(self, pattern: Pattern) -> dict:
        m = self.model
        shape = dict(model=m.name, layers=m.layers, context=self.context, batch=self.batch)
        shape.update(dict(queries=self.queries) if self.phase is PREFILL else
                     dict(next_n=1, cache="fp8"))
        shape.update(H=m.heads, D=m.head_dim, Hq=m.mla_heads, k=m.topk,
                     pattern=pattern.config.pattern, num_full=pattern.config.num_full)
        return shape

    def label(self) -> str:
        size = f"S={self.queries}" if self.phase is PREFILL else f"B={self.batch}"
        return f"{self.model.name} {self.phase.name} ctx={self.context} {size}"


@dataclass(frozen=True)
class Phase:
    name: str
    op: str
    graph: bool              # time as CUDA-graph replays (decode) or eagerly (prefill)
    inputs: Callable[[Group, torch.device], tuple[Callable[[], SimpleNamespace], int | None]]
    indexer: Callable[[IndexCache, int, SimpleNamespace], torch.Tensor]
    attend: Callable[[SimpleNamespace, torch.Tensor], object]


def _prefill_inputs(g: Group, dev: torch.device):
    m, S, N = g.model, g.queries, g.context

    def make() -> SimpleNamespace:
        return SimpleNamespace(
            q_idx=harness.random_e4m3((S, m.heads, m.head_dim), dev),
            k_idx=harness.random_e4m3((N, m.head_dim), dev),
            k_scale=torch.rand(N, device=dev) + 0.5,
            weights=torch.randn(S, m.heads, device=dev) * (m.heads * m.head_dim) ** -0.5,
            ks=torch.zeros(S, dtype=torch.int32, device=dev),
            ke=harness.causal_tail_ends(S, N).to(dev),
            q=torch.randn(S, m.mla_heads, MLA_DIM_QK, dtype=torch.bfloat16, device=dev),
            kv=torch.randn(N, 1, MLA_DIM_QK, dtype=torch.bfloat16, device=dev),
            out=torch.empty(S, m.mla_heads, MLA_DIM_V, dtype=torch.bfloat16, device=dev),
            lse=torch.empty(S, m.mla_heads, device=dev))
    return make, None        # a prefill layer touches all of its set


def _indexer_cache(pages: int, head_dim: int, dev: torch.device) -> torch.Tensor:
    """Paged FP8 indexer K cache in DeepGEMM's layout: per page 64 rows of D e4m3, 64 f32 scales."""
    cache = torch.empty(pages, PAGE_SIZE * (head_dim + 4), dtype=torch.uint8, device=dev)
    harness.fill_e4m3_(cache[:, :PAGE_SIZE * head_dim].view(torch.float8_e4m3fn))
    cache[:, PAGE_SIZE * head_dim:].view(torch.float32).uniform_(0.5, 1.5)
    return cache.view(pages, PAGE_SIZE, 1, head_dim + 4)


def _decode_inputs(g: Group, dev: torch.device):
    m, B, N = g.model, g.batch, g.context
    pages = B * -(-N // PAGE_SIZE)

    def make() -> SimpleNamespace:
        return SimpleNamespace(
            q_idx=harness.random_e4m3((B, 1, m.heads, m.head_dim), dev),
            k_cache=_indexer_cache(pages, m.head_dim, dev),
            weights=torch.randn(B, m.heads, device=dev) * (m.heads * m.head_dim) ** -0.5,
            context_lens=torch.full((B,), N, dtype=torch.int32, device=dev),
            # one block table for both caches: a page id names the same tokens in each
            block_table=harness.paged_block_table(B, N, dev),
            max_context_len=N,
            q=torch.randn(B, 1, m.mla_heads, MLA_DIM_QK, dtype=torch.bfloat16, device=dev),
            kv_cache=_paged_mla_cache(pages, "fp8", dev),
            out=torch.empty(B, 1, m.mla_heads, MLA_DIM_V, dtype=torch.bfloat16, device=dev),
            lse=torch.empty(B, 1, m.mla_heads, device=dev))
    # what one layer reads and writes (the caches are allocated far larger than one step reads)
    touched = (harness.indexer_paged_bytes([N] * B, 1, m.heads, m.head_dim, B * m.topk * 4)
               + harness.sparse_mla_decode_bytes(B, m.mla_heads, m.topk,
                                                 harness.MLA_FP8_ROW_BYTES))
    return make, touched


PREFILL = Phase(
    "prefill", PREFILL_OP, graph=False, inputs=_prefill_inputs,
    indexer=lambda cache, layer, x: cache.prefill(
        layer, x.q_idx, x.k_idx, x.k_scale, x.weights, x.ks, x.ke),
    attend=lambda x, idx: ops.sparse_mla_prefill(
        x.q, x.kv, idx, SM_SCALE, MLA_DIM_V, out=x.out, lse=x.lse))
DECODE = Phase(
    "decode", DECODE_OP, graph=True, inputs=_decode_inputs,
    indexer=lambda cache, layer, x: cache.decode(
        layer, x.q_idx, x.k_cache, x.weights, x.context_lens, x.block_table, x.max_context_len),
    attend=lambda x, idx: ops.sparse_mla_decode(
        x.q, x.kv_cache, idx.view(x.q.shape[0], 1, -1), x.block_table, SM_SCALE, MLA_DIM_V,
        out=x.out, lse=x.lse))


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    mode: str                # file-name tag: headline, quick or sweep
    models: tuple[Model, ...]
    queries: int
    prefill_contexts: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    batches: tuple[int, ...]
    retentions: tuple[int, ...]
    budget_s: float

    def groups(self, model: Model) -> list[Group]:
        return ([Group(model, PREFILL, n, 1, self.queries) for n in self.prefill_contexts]
                + [Group(model, DECODE, n, b, b) for n in self.decode_contexts
                   for b in self.batches])


def make_plan(cuda: bool, quick: bool = False, sweep: bool = False,
              model_names: Sequence[str] = (), budget_s: float = 0.1) -> Plan:
    retentions = QUICK_RETENTIONS if quick else RETENTIONS
    if not cuda:
        return Plan("quick" if quick else "headline", (CPU_MODEL,), CPU_QUERIES, CPU_CONTEXTS,
                    CPU_CONTEXTS, CPU_BATCHES, retentions, budget_s)
    models = tuple(m for m in MODELS if not model_names or m.name in model_names)
    if quick:
        return Plan("quick", models, PREFILL_QUERIES, QUICK_CONTEXTS, QUICK_CONTEXTS,
                    QUICK_BATCHES, retentions, budget_s)
    contexts = SWEEP_CONTEXTS if sweep else CONTEXTS
    return Plan("sweep" if sweep else "headline", models, PREFILL_QUERIES, contexts, contexts,
                BATCHES, retentions, budget_s)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def run_step(phase: Phase, cache: IndexCache, sets: Sequence[SimpleNamespace], layers: int) -> None:
    """One model step: every layer's indexer call (a Full layer computes, a Shared one returns
    its source's view) and its attention, layer l reading input set l mod len(sets)."""
    for layer in range(layers):
        x = sets[layer % len(sets)]
        phase.attend(x, phase.indexer(cache, layer, x))


def time_step(step: Callable[[object], object], machine: harness.Machine, phase: Phase,
              reps: int, budget_s: float) -> harness.Timing:
    if machine.cuda and not phase.graph:
        # A prefill step takes up to seconds and its rep count is fixed here: time_fn's generic
        # warm-up (two more steps, one of them to size the loop) would add two thirds to the
        # row's cost. The per-op timings just ran every kernel of the step on the same inputs.
        return harness._timing(harness._time_cuda_eager(step, [None], reps), 1, graph=False)
    return harness.time_fn(step, [None], graph=phase.graph, reps=None if phase.graph else reps,
                           budget_s=budget_s, machine=machine)


def reuse_host_s(phase: Phase, cache: IndexCache, x: SimpleNamespace) -> float | None:
    """Host seconds of one Shared layer's call (mean of REUSE_CALLS), None without Shared layers."""
    shared = cache.config.shared_layers
    if not shared:
        return None
    cache.begin_step()
    phase.indexer(cache, cache.config.source_layer(shared[0]), x)
    start = time.perf_counter()
    for _ in range(REUSE_CALLS):
        phase.indexer(cache, shared[0], x)
    return (time.perf_counter() - start) / REUSE_CALLS


@dataclass(frozen=True)
class Result:
    group: Group
    pattern: Pattern
    timing: harness.Timing   # of the step
    t_indexer_s: float       # per-op times of the group
    t_attention_s: float
    reuse_s: float | None    # reuse_host_s
    speedup: float           # all-Full step time over this step's
    bound: float             # amdahl_bound

    @property
    def pct_of_bound(self) -> float:
        return 100 * self.speedup / self.bound

    @property
    def kcache_bytes_saved(self) -> int:
        return self.pattern.config.indexer_k_cache_bytes_saved(
            context_len=self.group.context, head_dim=self.group.model.head_dim)


def measure_group(g: Group, caches: dict[str, tuple[Pattern, IndexCache]],
                  machine: harness.Machine, budget_s: float) -> list[Result]:
    """Per-op times (a Full layer's indexer call, the attention every layer runs), then one step
    per pattern."""
    L, phase = g.model.layers, g.phase
    make, touched = phase.inputs(g, machine.torch_device)
    sets = harness.rotating_sets(make, machine, touched)
    full = caches[REFERENCE][1]
    # layer 0's buffer is the Full-layer path a step takes; its indices feed the attention timing
    indices = phase.indexer(full, 0, sets[0])
    op_time = lambda fn: harness.time_fn(fn, sets, graph=phase.graph, budget_s=budget_s,
                                         machine=machine).median_s
    t_idx = op_time(lambda x: phase.indexer(full, 0, x))
    t_att = op_time(lambda x: phase.attend(x, indices))
    print(f"  {g.label()}: indexer_topk {t_idx * 1e3:.3f} ms, attention {t_att * 1e3:.3f} ms "
          f"per layer ({len(sets)} input set{'s' if len(sets) > 1 else ''})", flush=True)
    timed = []
    for pattern, cache in caches.values():
        F = pattern.config.num_full
        predicted = F * (t_idx + t_att) + (L - F) * t_att
        reps = min(MAX_STEP_REPS, max(MIN_STEP_REPS, int(budget_s / predicted)))
        timing = time_step(lambda _: run_step(phase, cache, sets, L), machine, phase, reps,
                           budget_s)
        timed.append((pattern, timing, reuse_host_s(phase, cache, sets[0])))
    reference = timed[0][1].median_s        # patterns() puts all-Full first
    results = [Result(g, pattern, timing, t_idx, t_att, reuse, reference / timing.median_s,
                      amdahl_bound(L, pattern.config.num_full, t_idx + t_att, t_att))
               for pattern, timing, reuse in timed]
    for r in results:
        _print_result(r)
    return results


def _print_result(r: Result) -> None:
    t = r.timing
    mode = "graph" if t.graph else "eager"
    print(f"    {r.pattern.name:<13} F {r.pattern.config.num_full:>2}/{r.group.model.layers}  "
          f"{t.median_s * 1e3:9.3f} ms ({t.reps} reps, {mode})  {r.speedup:.3f}x  "
          f"bound {r.bound:.3f}x  {r.pct_of_bound:5.1f} % of bound  "
          f"K cache saved {r.kcache_bytes_saved / 2**20:.1f} MiB/seq"
          + (f"  [{t.note}]" if t.note else ""), flush=True)


def result_row(r: Result, ceilings: harness.Ceilings) -> dict:
    """DESIGN §7 row plus the stack's keys. No FLOP or byte rate: the step mixes fp8 indexer and
    bf16 attention work whose amounts differ per pattern, so no one ceiling applies."""
    row = harness.make_row(r.group.phase.op, r.pattern.name, r.group.shape(r.pattern),
                           r.timing.median_s, None, None, None, ceilings)
    sig = harness._sig
    row.update(speedup=sig(r.speedup), amdahl_bound=sig(r.bound),
               pct_of_bound=sig(r.pct_of_bound), kcache_bytes_saved=r.kcache_bytes_saved,
               indexer_us=sig(r.t_indexer_s * 1e6), attention_us=sig(r.t_attention_s * 1e6),
               reuse_host_us=None if r.reuse_s is None else sig(r.reuse_s * 1e6, 3))
    return row


def run(plan: Plan, machine: harness.Machine) -> tuple[list[Result], int]:
    """Every group of every model; a group that does not fit or breaks is printed and skipped.
    Returns the results and the number of failed groups."""
    results, failed = [], 0
    for model in plan.models:
        pats = patterns(model.layers, plan.retentions)
        caches = {p.name: (p, IndexCache(p.config, max_tokens=plan.queries, topk=model.topk,
                                         device=machine.torch_device,
                                         max_batch=max(plan.batches)))
                  for p in pats}
        for g in plan.groups(model):
            torch.manual_seed(0)
            try:
                results += measure_group(g, caches, machine, plan.budget_s)
            except Exception as err:  # noqa: BLE001 - one broken group must not end the run
                status, reason = harness._classify(err)
                failed += status == "failed"
                print(f"  {g.label()}: {status.upper()}: {reason}", flush=True)
            if machine.cuda:
                torch.cuda.empty_cache()
        del caches
    return results, failed


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, plot
# ---------------------------------------------------------------------------------------------

def table_lines(results: Sequence[Result]) -> list[str]:
    cols = ("model", "phase", "context", "batch", "pattern", "F/L", "step_ms", "speedup",
            "bound", "%bound", "kcache_MiB/seq")
    table = [(r.group.model.name, r.group.phase.name, str(r.group.context), str(r.group.batch),
              r.pattern.name, f"{r.pattern.config.num_full}/{r.group.model.layers}",
              f"{r.timing.median_s * 1e3:.3f}", f"{r.speedup:.3f}", f"{r.bound:.3f}",
              f"{r.pct_of_bound:.1f}", f"{r.kcache_bytes_saved / 2**20:.1f}") for r in results]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(cols), line("-" * w for w in widths)] + [line(t) for t in table]


def plot(results: Sequence[Result], path: Path) -> Path | None:
    """Speed-up over all-Full against context (solid) and its Amdahl bound (dashed), one panel per
    model and phase (decode: per batch). None when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        panels.setdefault((r.group.model.name, r.group.phase.name, r.group.batch), []).append(r)
    models = sorted({k[0] for k in panels})
    columns = sorted({k[1:] for k in panels}, key=lambda c: (c[0] != "prefill", c[1]))
    fig, axes = plt.subplots(len(models), len(columns), squeeze=False, sharex=True,
                             figsize=(4.2 * len(columns), 3.4 * len(models)))
    names = list(dict.fromkeys(r.pattern.name for r in results if r.pattern.name != REFERENCE))
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    for (model, phase, batch), rs in panels.items():
        ax = axes[models.index(model)][columns.index((phase, batch))]
        ax.axhline(1.0, color="grey", lw=0.8)
        for name in names:
            pts = sorted((r.group.context, r.speedup, r.bound) for r in rs
                         if r.pattern.name == name)
            if pts:
                x, y, bound = zip(*pts)
                ax.plot(x, y, "o-", color=colours[name], label=name)
                ax.plot(x, bound, "--", color=colours[name], lw=0.8)
        ax.set_xscale("log", base=2)
        contexts = sorted({r.group.context for r in rs})
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_title(f"{model} {phase}" + (f" B={batch}" if phase == "decode" else ""), fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speed-up vs all-Full")
    axes[0][0].legend(fontsize=7, title="dashed: Amdahl bound", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DSA stack benchmark: IndexCache patterns vs all-Full")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="64K context, patterns all-Full and 1/4, decode batch {1, 128}")
    size.add_argument("--sweep", action="store_true",
                      help="contexts {8K, 32K, 64K, 128K, 200K} (default {8K, 64K, 200K})")
    p.add_argument("--models", default="",
                   help=f"comma list among {','.join(m.name for m in MODELS)} (default: both)")
    p.add_argument("--budget", type=float, default=0.1,
                   help="seconds of timed calls per per-op time and per decode row; prefill steps "
                        f"repeat budget / step time times, at least {MIN_STEP_REPS}")
    p.add_argument("--out", type=Path, default=harness.DEFAULT_OUT_DIR,
                   help="directory for the JSON and the PNG")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - {m.name for m in MODELS}
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; known: {[m.name for m in MODELS]}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 1 when a group failed (one that does not fit is skipped, not failed)."""
    args = parse_args(argv)
    start = time.perf_counter()
    machine = harness.detect_machine()
    commit = harness.current_commit()
    plan = make_plan(machine.cuda, args.quick, args.sweep, args.models, args.budget)
    print(f"device: {machine.device}  torch {torch.__version__}  commit {commit}  "
          f"mode {plan.mode}  budget {plan.budget_s} s", flush=True)
    if not machine.cuda:
        print("CPU FALLBACK: no CUDA device; one tiny 4-layer model (H=32, Hq=16, k=64, "
              "context 256), perf_counter timing, ceilings null. These numbers say nothing about "
              "the GPU kernels.", flush=True)
    elif any(m.name == "glm-5" for m in plan.models):
        print("note: glm-5 runs MLA with Hq = 64 as a stand-in for its heads per GPU under "
              "tensor parallelism", flush=True)
    ceilings = harness.measure_ceilings(machine)
    print(ceilings.describe(), flush=True)
    print(f"\n=== {FAMILY} ({plan.mode}, {machine.device}): one layer's inputs serve every layer",
          flush=True)
    results, failed = run(plan, machine)

    stem = args.out / f"{FAMILY}-{plan.mode}-{machine.slug}"
    rows = [result_row(r, ceilings) for r in results]
    json_path = harness.write_results(
        harness.results_document(machine, ceilings, commit, rows), stem.with_suffix(".json"))
    png_path = plot(results, stem.with_suffix(".png"))
    print("\n=== summary\n" + "\n".join(table_lines(results)), flush=True)
    print(f"wrote {json_path} ({len(rows)} rows)", flush=True)
    print(f"wrote {png_path}" if png_path else "no plot: matplotlib is not importable", flush=True)
    # printed so a run's cost can be checked against the estimate in the module docstring
    print(f"elapsed {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
