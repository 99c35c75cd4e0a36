"""Train the tiny DSA model on CPython's own source, then measure IndexCache on it.

Stages (timings of each are reported):

1. training: dense warm-up (dense causal attention; every indexer trained with KL to its layer's
   head-summed attention over all visible keys), then sparse training (top-k selection through
   this package's ops, LM loss, indexer KL over the selected keys);
2. adjacent-layer top-k overlap matrix (all layers Full) on held-out text;
3. held-out LM loss of the all-Full model, of uniform patterns and of patterns found by
   ``indexcache_ops.search.greedy_search`` on the calibration split, at 1/2, 1/4, 1/8 retention;
4. multi-layer distillation: the Full indexers of the uniform 1/4 pattern fine-tuned with
   ``indexcache_ops.distill.multi_layer_distillation_loss`` against the mean dense attention of
   the layers each one serves, then evaluated.

Writes ``results.json``, ``results.md`` and PNGs to ``--out`` and prints a markdown table last.

    python examples/tiny_dsa/train.py                 # main config, GPU (~5 minutes on an H100)
    python examples/tiny_dsa/train.py --tiny --device cpu --out /tmp/tiny_dsa
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    # Run as a file (python examples/tiny_dsa/train.py): import the package and this example from
    # the checkout, as `python -m examples.tiny_dsa.train` would.
    sys.path.insert(0, str(ROOT))

from bench.harness import current_commit  # noqa: E402
from examples.tiny_dsa.model import MAIN, TINY, DSAConfig, TinyDSA  # noqa: E402
from indexcache_ops.analysis import overlap_matrix  # noqa: E402
from indexcache_ops.distill import multi_layer_distillation_loss  # noqa: E402
from indexcache_ops.layers import uniform_pattern  # noqa: E402
from indexcache_ops.reuse import IndexCacheConfig  # noqa: E402
from indexcache_ops.search import greedy_search  # noqa: E402

SPLITS = ("train", "calibration", "heldout")
RETENTIONS = (2, 4, 8)  # keep 1/2, 1/4, 1/8 of the indexers
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run settings. Training and distillation stop at ``steps`` or ``seconds``, whichever comes
    first; learning rate and the dense -> sparse switch follow the progress towards that end."""

    model: DSAConfig
    batch: int
    steps: int
    train_seconds: float
    dense_frac: float
    lr: float
    warmup_steps: int
    calib_seqs: int
    heldout_seqs: int
    eval_batch: int
    overlap_seqs: int
    distill_steps: int
    distill_seconds: float
    distill_lr: float
    log_every: int


# Sized for one H100 in about 6 minutes end to end: training 210 s, greedy search ~120 calibration
# evaluations of 32 x 1024 tokens, 9 held-out evaluations of 128 x 1024 tokens, distillation 45 s.
MAIN_SETTINGS = Settings(MAIN, batch=8, steps=3000, train_seconds=210.0, dense_frac=0.3, lr=2e-3,
                         warmup_steps=100, calib_seqs=32, heldout_seqs=128, eval_batch=16,
                         overlap_seqs=8, distill_steps=400, distill_seconds=45.0, distill_lr=1e-3,
                         log_every=100)
# A few steps of every stage on a CPU, in seconds.
TINY_SETTINGS = Settings(TINY, batch=4, steps=8, train_seconds=60.0, dense_frac=0.5, lr=3e-3,
                         warmup_steps=2, calib_seqs=4, heldout_seqs=8, eval_batch=4,
                         overlap_seqs=2, distill_steps=3, distill_seconds=20.0, distill_lr=1e-3,
                         log_every=2)


# ---- data -------------------------------------------------------------------------------------

def split_of(relpath: str) -> str:
    """Split of a file by a hash of its path relative to the stdlib root: 5 % calibration, 5 %
    held-out, 90 % train; the same on every machine with the same stdlib."""
    bucket = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "little") % 100
    return "calibration" if bucket < 5 else "heldout" if bucket < 10 else "train"


def load_corpus(root: Optional[Path] = None) -> tuple[dict[str, np.ndarray], dict]:
    """Byte streams of CPython's standard library ``*.py`` files, one per split, files joined by
    a NUL byte (which source text does not contain). Installed third-party packages are skipped."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
                   if p.is_file()
                   and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for rel, path in files:
        parts[split_of(rel)].append(path.read_bytes())
    streams = {s: np.frombuffer(b"\0".join(parts[s]), dtype=np.uint8) for s in SPLITS}
    stats = {"stdlib": str(root),
             "files": {s: len(parts[s]) for s in SPLITS},
             "bytes": {s: int(streams[s].size) for s in SPLITS}}
    return streams, stats


def fixed_windows(stream: torch.Tensor, count: int, length: int, per_batch: int) -> list:
    """``count`` windows of ``length + 1`` bytes spread evenly over the stream, in batches."""
    starts = torch.linspace(0, stream.numel() - length - 2, count).long()
    windows = stream[starts.to(stream.device)[:, None]
                     + torch.arange(length + 1, device=stream.device)].long()
    return list(windows.split(per_batch))


def random_windows(stream: torch.Tensor, count: int, length: int,
                   gen: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length + 1`` bytes; ``gen`` lives on the stream's device, so
    drawing them does not stall the host on a copy every step."""
    starts = torch.randint(0, stream.numel() - length - 1, (count,), generator=gen,
                           device=stream.device)
    return stream[starts[:, None] + torch.arange(length + 1, device=stream.device)].long()


# ---- training ---------------------------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on GPU; float32 on CPU (CPU bf16 is slower, and the CPU runs are tiny)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    """Progress of a phase in [0, 1]: the larger of the step share and the time share, so that a
    slower machine ends the phase on time with fewer steps (recorded) instead of overrunning."""

    def __init__(self, steps: int, seconds: float):
        self.steps, self.seconds, self.start = steps, seconds, time.perf_counter()

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.perf_counter() - self.start) / self.seconds)

    def stopped_by(self, step: int) -> str:
        return "steps" if step >= self.steps else "time"


def cosine_lr(base: float, step: int, warmup: int, progress: float) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def causal_rows(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``[batch * length, length]`` bool: row ``b * L + t`` sees keys ``s <= t``."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().repeat(batch, 1)


def make_optimizer(model: TinyDSA, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    # Fused on GPU: one kernel for the whole update instead of several per parameter.
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=decay[0].is_cuda)


def train_step(model: TinyDSA, opt: torch.optim.Optimizer, tokens: torch.Tensor, sparse: bool,
               causal: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of either stage; returns the (LM loss, mean per-layer indexer KL), not synced.

    Dense: attention over all visible keys, each indexer against its layer's attention (KL over
    the visible keys). Sparse: every layer Full, attention over its indexer's top-k, KL over the
    selected keys. The indexer input is detached, so the LM loss trains the main model and the KL
    trains the indexers; each part is clipped on its own.
    """
    device = tokens.device
    cfg = model.cfg
    all_full = IndexCacheConfig(cfg.n_layers) if sparse else None
    with autocast(device):
        trace = model(tokens[:, :-1], all_full, indexer_scores=True, teacher="used")
        lm = F.cross_entropy(trace.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    kls = []
    for scores, attention, indices in zip(trace.indexer_scores, trace.attention, trace.indices):
        if sparse:
            kls.append(multi_layer_distillation_loss(scores, [attention],
                                                     selected=indices.flatten(0, 1),
                                                     reduction="mean"))
        else:
            kls.append(multi_layer_distillation_loss(scores, [attention], mask=causal,
                                                     reduction="mean"))
    kl = torch.stack(kls).sum()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    (lm + kl).backward()
    indexer = set(model.indexer_parameters())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p not in indexer], 1.0)
    torch.nn.utils.clip_grad_norm_(list(indexer), 1.0)
    opt.step()
    return lm.detach(), kl.detach() / cfg.n_layers


def train(model: TinyDSA, stream: torch.Tensor, settings: Settings, gen: torch.Generator) -> dict:
    device, cfg = stream.device, model.cfg
    opt = make_optimizer(model, settings.lr)
    causal = causal_rows(settings.batch, cfg.context, device)
    budget = Budget(settings.steps, settings.train_seconds)
    curve, step, dense_steps = [], 0, 0
    model.train()
    while (progress := budget.progress(step)) < 1.0:
        sparse = progress >= settings.dense_frac
        if not sparse:
            dense_steps += 1
        tokens = random_windows(stream, settings.batch, cfg.context, gen)
        lr = cosine_lr(settings.lr, step, settings.warmup_steps, progress)
        lm, kl = train_step(model, opt, tokens, sparse, causal, lr)
        step += 1
        if step % settings.log_every == 0 or step == 1:
            curve.append({"step": step, "phase": "sparse" if sparse else "dense",
                          "lm_loss": lm.item(), "indexer_kl": kl.item(), "lr": lr})
            log(f"train step {step:5d} {curve[-1]['phase']:6s} lm {curve[-1]['lm_loss']:.4f} "
                f"indexer KL {curve[-1]['indexer_kl']:.4f} lr {lr:.2e}")
    sync(device)
    return {"steps": step, "dense_steps": dense_steps, "sparse_steps": step - dense_steps,
            "stopped_by": budget.stopped_by(step), "tokens": step * settings.batch * cfg.context,
            "seconds": time.perf_counter() - budget.start, "curve": curve}


# ---- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def lm_loss(model: TinyDSA, batches: list, pattern: Optional[str]) -> float:
    """Mean next-byte loss (nats) over the batches; pattern None = dense attention."""
    model.eval()
    config = None if pattern is None else IndexCacheConfig(
        model.cfg.n_layers, index_topk_pattern=pattern)
    total, count = torch.zeros((), device=batches[0].device), 0
    for tokens in batches:
        with autocast(tokens.device):
            logits = model(tokens[:, :-1], config).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(),
                                 reduction="sum")
        count += tokens[:, 1:].numel()
    return (total / count).item()


@torch.no_grad()
def layer_overlap(model: TinyDSA, tokens: torch.Tensor) -> torch.Tensor:
    """Top-k overlap matrix of all layers (all Full), over the queries that see more than k keys
    (earlier ones select every visible key in every layer and would read as overlap 1)."""
    model.eval()
    cfg = model.cfg
    with autocast(tokens.device):
        trace = model(tokens[:, :-1], IndexCacheConfig(cfg.n_layers))
    return overlap_matrix([idx[:, cfg.topk:].reshape(-1, cfg.topk) for idx in trace.indices])


def chance_overlap(topk: int, context: int) -> float:
    """Mean overlap of two independent uniformly random top-k sets over the queries that
    :func:`layer_overlap` counts: the query at position ``t`` (``topk <= t < context``) sees
    ``t + 1`` keys, so two random k-subsets share ``k / (t + 1)`` of their entries on average.
    The floor a measured overlap is to be read against (1.0 at ``k >= context``)."""
    if topk >= context:
        return 1.0
    return sum(topk / (t + 1) for t in range(topk, context)) / (context - topk)


def pattern_at(result, num_layers: int, num_full: int) -> str:
    """The searched pattern with ``num_full`` Full layers: greedy steps only add flips, so every
    smaller retention's pattern lies on the trajectory of the deepest search."""
    if num_full == num_layers:
        return "F" * num_layers
    return result.steps[num_layers - num_full - 1].pattern


def distill(model: TinyDSA, pattern: str, stream: torch.Tensor, settings: Settings,
            gen: torch.Generator) -> tuple[TinyDSA, dict]:
    """Fine-tune only the Full layers' indexers of ``pattern`` with the multi-layer distillation
    loss: each against the mean dense attention (over all visible keys) of the layers it serves,
    computed in the pattern's own sparse forward pass. Returns a copy; ``model`` is untouched."""
    device, cfg = stream.device, model.cfg
    student = copy.deepcopy(model)
    config = IndexCacheConfig(cfg.n_layers, index_topk_pattern=pattern)
    served = {f: [j for j in range(cfg.n_layers) if config.source_layer(j) == f]
              for f in config.full_layers}
    student.requires_grad_(False)
    params = student.indexer_parameters(config.full_layers)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.distill_lr, betas=(0.9, 0.95), weight_decay=0.0)
    causal = causal_rows(settings.batch, cfg.context, device)
    budget = Budget(settings.distill_steps, settings.distill_seconds)
    losses, step = [], 0
    student.train()
    while (progress := budget.progress(step)) < 1.0:
        tokens = random_windows(stream, settings.batch, cfg.context, gen)
        with autocast(device):
            trace = student(tokens[:, :-1], config, indexer_scores=True, teacher="dense")
        loss = sum(multi_layer_distillation_loss(
            trace.indexer_scores[f], [trace.attention[j] for j in served[f]], mask=causal,
            reduction="mean") for f in config.full_layers) / len(served)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(settings.distill_lr, step, max(1, settings.warmup_steps // 4),
                                    progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % settings.log_every == 0 or step == 1:
            losses.append({"step": step, "kl": loss.item()})
            log(f"distill step {step:4d} multi-layer KL {losses[-1]['kl']:.4f}")
    sync(device)
    return student, {"pattern": pattern, "served": {str(f): s for f, s in served.items()},
                     "steps": step, "stopped_by": budget.stopped_by(step),
                     "seconds": time.perf_counter() - budget.start, "curve": losses}


# ---- reporting --------------------------------------------------------------------------------

def save_plots(out: Path, results: dict) -> list[str]:
    """PNGs of the overlap matrix, held-out loss against retention and the training curve; none
    (and a note) where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no PNGs written")
        return []
    written = []

    matrix = np.array(results["overlap"]["matrix"])
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] < 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set(xlabel="layer j", ylabel="layer i",
           title="top-k overlap |S_i ∩ S_j| / |S_i| (held-out)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "overlap_matrix.png", dpi=130)
    plt.close(fig)
    written.append("overlap_matrix.png")

    rows = {(r["name"], r["retention"]): r for r in results["heldout"]["rows"]}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [1] + list(RETENTIONS)
    full = rows[("all-Full", "1")]["loss"]
    for name, marker in (("uniform", "o"), ("searched", "s")):
        ax.plot(xs, [full] + [rows[(name, f"1/{r}")]["loss"] for r in RETENTIONS], marker=marker,
                label=name)
    ax.plot([4], [rows[("uniform + distillation", "1/4")]["loss"]], "D",
            label="uniform + distillation")
    ax.axhline(full, color="grey", linestyle="--", linewidth=0.8, label="all-Full")
    ax.axhline(full * 1.01, color="grey", linestyle=":", linewidth=0.8, label="all-Full + 1 %")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, ["1"] + [f"1/{r}" for r in RETENTIONS])
    ax.set(xlabel="indexers kept", ylabel="held-out loss (nats/byte)", title="IndexCache patterns")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "heldout_loss.png", dpi=130)
    plt.close(fig)
    written.append("heldout_loss.png")

    curve = results["training"]["curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for phase in ("dense", "sparse"):
        points = [c for c in curve if c["phase"] == phase]
        ax.plot([c["step"] for c in points], [c["lm_loss"] for c in points], ".-", label=phase)
    ax.set(xlabel="step", ylabel="train LM loss (nats/byte)", title="training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_loss.png", dpi=130)
    plt.close(fig)
    written.append("train_loss.png")
    return written


def markdown_table(rows: list[dict]) -> str:
    lines = ["| setting | indexers kept | pattern | held-out loss | Δ vs all-Full |",
             "|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f} %"
        lines.append(f"| {r['name']} | {r['retention']} | `{r['pattern'] or 'dense'}` | "
                     f"{r['loss']:.4f} | {delta} |")
    return "\n".join(lines)


def expectations(rows: list[dict]) -> list[dict]:
    """The paper's claims, checked against what this run measured (never tuned to hold)."""
    by = {(r["name"], r["retention"]): r for r in rows}
    searched4, uniform8 = by[("searched", "1/4")], by[("uniform", "1/8")]
    searched8, distilled4 = by[("searched", "1/8")], by[("uniform + distillation", "1/4")]
    same8 = searched8["pattern"] == uniform8["pattern"]
    return [
        {"claim": "searched 1/4 within 1 % of all-Full",
         "measured": f"{searched4['delta_pct']:+.2f} %", "holds": searched4["delta_pct"] <= 1.0},
        {"claim": "searched beats uniform at 1/8",
         "measured": f"{searched8['loss']:.4f} vs {uniform8['loss']:.4f}"
                     + (" (same pattern)" if same8 else ""),
         "holds": searched8["loss"] < uniform8["loss"]},
        {"claim": "distillation brings uniform 1/4 within 1 %",
         "measured": f"{distilled4['delta_pct']:+.2f} % (before: "
                     f"{by[('uniform', '1/4')]['delta_pct']:+.2f} %)",
         "holds": distilled4["delta_pct"] <= 1.0},
    ]


# ---- driver -----------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the CPU few-step configuration")
    parser.add_argument("--steps", type=int, help="training steps (default: 3000 main, 8 tiny; "
                        "training also stops at its time budget)")
    parser.add_argument("--train-seconds", type=float, help="training time budget")
    parser.add_argument("--layers", type=int, help="number of layers (default 16 main, 4 tiny)")
    parser.add_argument("--topk", type=int, help="keys per query in sparse attention "
                        "(default 128 main, 16 tiny)")
    parser.add_argument("--context", type=int, help="training / evaluation sequence length "
                        "(default 1024 main, 128 tiny)")
    parser.add_argument("--d-model", type=int, help="model width (default 256 main, 64 tiny)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tiny_dsa")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    settings = TINY_SETTINGS if args.tiny else MAIN_SETTINGS
    overrides = {k: v for k, v in (("steps", args.steps), ("train_seconds", args.train_seconds))
                 if v is not None}
    model_overrides = {k: v for k, v in (("n_layers", args.layers), ("topk", args.topk),
                                         ("context", args.context), ("d_model", args.d_model))
                       if v is not None}
    if model_overrides:
        overrides["model"] = dataclasses.replace(settings.model, **model_overrides)
    settings = dataclasses.replace(settings, **overrides)
    # What the command line changed against the --tiny / main defaults (recorded in results.json).
    changed = {k: v for k, v in overrides.items() if k != "model"} | model_overrides
    cfg, n = settings.model, settings.model.n_layers
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    timings = {}

    started = time.perf_counter()
    streams, data_stats = load_corpus()
    data = {s: torch.from_numpy(streams[s].copy()).to(device) for s in SPLITS}
    calib = fixed_windows(data["calibration"], settings.calib_seqs, cfg.context,
                          settings.eval_batch)
    heldout = fixed_windows(data["heldout"], settings.heldout_seqs, cfg.context,
                            settings.eval_batch)
    timings["data"] = time.perf_counter() - started
    log(f"data: {data_stats['files']} files, {data_stats['bytes']} bytes from "
        f"{data_stats['stdlib']}")

    torch.manual_seed(args.seed)
    model = TinyDSA(cfg).to(device)
    gen = torch.Generator(device).manual_seed(args.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {cfg}, "
        f"device {device}")
    training = train(model, data["train"], settings, gen)
    timings["train"] = training["seconds"]
    log(f"trained {training['steps']} steps ({training['dense_steps']} dense, "
        f"{training['sparse_steps']} sparse; stopped by {training['stopped_by']}) in "
        f"{training['seconds']:.1f} s")

    started = time.perf_counter()
    matrix = layer_overlap(model, heldout[0][:settings.overlap_seqs]).cpu()
    adjacent = [matrix[i, i + 1].item() for i in range(n - 1)]
    timings["overlap"] = time.perf_counter() - started
    chance = chance_overlap(cfg.topk, cfg.context)
    adjacent_mean = sum(adjacent) / max(1, len(adjacent))
    log("adjacent-layer top-k overlap: " + " ".join(f"{a:.2f}" for a in adjacent)
        + f" (mean {adjacent_mean:.2f}; two random top-{cfg.topk} sets: "
        f"{chance:.2f})")

    started = time.perf_counter()
    evaluations = 0

    def evaluate(pattern: str) -> float:
        nonlocal evaluations
        evaluations += 1
        return lm_loss(model, calib, pattern)

    targets = {r: max(1, n // r) for r in RETENTIONS}
    search = greedy_search(evaluate, n, min(targets.values()), progress=False)
    sync(device)
    timings["search"] = time.perf_counter() - started
    for s in search.steps:
        log(f"search step {s.step + 1:2d}: layer {s.flipped:2d} -> Shared, calibration loss "
            f"{s.loss:.4f}, {s.pattern}")
    log(f"greedy search: {evaluations} calibration evaluations in {timings['search']:.1f} s")

    started = time.perf_counter()
    full_loss = lm_loss(model, heldout, "F" * n)
    rows = [{"name": "dense attention", "retention": "-", "pattern": None,
             "loss": lm_loss(model, heldout, None)},
            {"name": "all-Full", "retention": "1", "pattern": "F" * n, "loss": full_loss}]
    for r, num_full in targets.items():
        for name, pattern in (("uniform", uniform_pattern(n, num_full)),
                              ("searched", pattern_at(search, n, num_full))):
            rows.append({"name": name, "retention": f"1/{r}", "pattern": pattern,
                         "loss": lm_loss(model, heldout, pattern)})
    sync(device)
    timings["heldout_evals"] = time.perf_counter() - started

    distilled, distillation = distill(model, uniform_pattern(n, targets[4]), data["train"],
                                      settings, torch.Generator(device).manual_seed(args.seed + 1))
    timings["distill"] = distillation["seconds"]
    started = time.perf_counter()
    rows.insert(6, {"name": "uniform + distillation", "retention": "1/4",
                    "pattern": distillation["pattern"],
                    "loss": lm_loss(distilled, heldout, distillation["pattern"])})
    timings["heldout_evals"] += time.perf_counter() - started
    for row in rows:
        row["num_full"] = None if row["pattern"] is None else row["pattern"].count("F")
        row["delta_pct"] = (None if row["name"] == "all-Full"
                            else 100.0 * (row["loss"] - full_loss) / full_loss)
    checks = expectations(rows)

    results = {
        "config": dataclasses.asdict(settings) | {"seed": args.seed, "tiny": args.tiny},
        "overrides": changed,
        "commit": current_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "data": data_stats | {"calibration_tokens": settings.calib_seqs * cfg.context,
                              "heldout_tokens": settings.heldout_seqs * cfg.context},
        "training": training,
        "overlap": {"matrix": matrix.tolist(), "adjacent": adjacent,
                    "adjacent_mean": adjacent_mean, "chance": chance,
                    "queries": f"{settings.overlap_seqs} held-out sequences, positions >= "
                               f"topk ({cfg.topk})"},
        "search": {"evaluations": evaluations, "baseline_loss": search.baseline_loss,
                   "steps": [dataclasses.asdict(s) for s in search.steps],
                   "patterns": {f"1/{r}": pattern_at(search, n, f) for r, f in targets.items()}},
        "distillation": distillation,
        "heldout": {"rows": rows, "loss_unit": "nats/byte"},
        "expectations": checks,
        "timings_s": timings | {"total": time.perf_counter() - T0},
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                               if device.type == "cuda" else None),
    }
    results["plots"] = save_plots(args.out, results)
    table = markdown_table(rows)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table + "\n")

    log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items())
        + ("" if results["peak_gpu_memory_gb"] is None
           else f"; peak GPU memory {results['peak_gpu_memory_gb']:.1f} GB"))
    log(f"wrote {args.out / 'results.json'}" + "".join(f", {p}" for p in results["plots"]))
    print("\nPaper's expectations, as measured in this run:")
    for c in checks:
        print(f"- {c['claim']}: {c['measured']} -> {'holds' if c['holds'] else 'does NOT hold'}")
    print()
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
