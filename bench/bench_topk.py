"""Top-k benchmark: k = 2048 over full f32 rows (DESIGN §5: 4·Σ row lengths bytes).

Headline: 4096 x 131072 (the prefill regime; floor 2.0 TB/s, target >= 90 % of copy) and one
131072 row (the decode regime; floor <= 15 us, target <= 8 us). Sweep: rows {1, 64, 4096} x
length {32K, 128K, 256K}. Impls: indexcache, torch.topk, FlashInfer's radix top-k when installed.
"""
from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace

import torch

from bench import harness
from bench.harness import Case, Context, Impl

FAMILY = "topk"
K = 2048
HEADLINE = [dict(rows=4096, len=131072, k=K), dict(rows=1, len=131072, k=K)]
SWEEP = [dict(rows=r, len=n, k=K) for r, n in itertools.product((1, 64, 4096), (32768, 131072, 262144))]
CPU_SHAPES = [dict(rows=4, len=8192, k=K), dict(rows=1, len=8192, k=K)]


def _case(ctx: Context, shape: dict, flashinfer_top_k) -> Case:
    rows, length, k = shape["rows"], shape["len"], shape["k"]

    def make_inputs() -> SimpleNamespace:
        return SimpleNamespace(
            logits=torch.randn(rows, length, device=ctx.device),
            out=torch.empty(rows, k, dtype=torch.int32, device=ctx.device))

    impls = [Impl("indexcache", lambda x: ctx.ops.topk(x.logits, k, out=x.out)),
             Impl("torch", lambda x: torch.topk(x.logits, k, dim=1, sorted=False))]
    if flashinfer_top_k is not None:
        impls.append(Impl("flashinfer", lambda x: flashinfer_top_k(x.logits, k, sorted=False)))
    nbytes = harness.topk_bytes([length] * rows)
    return Case(op="topk", shape=shape, make_inputs=make_inputs, impls=impls, nbytes=nbytes,
                touched_bytes=nbytes, headline=shape in HEADLINE)


def cases(ctx: Context) -> list[Case]:
    flashinfer = harness.optional_module("flashinfer")
    top_k = getattr(flashinfer, "top_k", None)    # flashinfer.top_k(input, k, sorted) -> (values, indices)
    if top_k is None:
        print("  flashinfer: " + ("not installed" if flashinfer is None else "installed, has no top_k"),
              flush=True)
    shapes = (SWEEP if ctx.sweep else HEADLINE) if ctx.machine.cuda else CPU_SHAPES
    return [_case(ctx, shape, top_k) for shape in shapes]


if __name__ == "__main__":
    sys.exit(harness.main([sys.modules[__name__]]))
