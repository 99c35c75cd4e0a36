"""Runs one benchmark case a few times, for a profiler to capture (bench/device_run.sh PROFILE).

    ncu --clock-control none -k regex:topk_kernel --launch-skip 2 -c 1 \\
        python3 -m bench.profile --family topk --op topk --shape "rows=4096 len=131072"

The case is the benchmark's own (same inputs, same call): family module bench_<family>, the case
whose op is --op and whose printed shape contains --shape, the impl --impl. Not timed here.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from bench import harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="topk, indexer, sparse_mla, ...")
    parser.add_argument("--op", required=True, help="the case's op, e.g. indexer_topk")
    parser.add_argument("--shape", default="", help="a substring of the case's printed shape")
    parser.add_argument("--impl", default="indexcache")
    parser.add_argument("--sweep", action="store_true", help="choose among the sweep shapes")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)

    machine = harness.detect_machine()
    ctx = harness.Context(machine=machine, sweep=args.sweep, ops=harness.load_ops())
    family = importlib.import_module(f"bench.bench_{args.family}")
    cases = [c for c in family.cases(ctx)
             if c.op == args.op and args.shape in harness.format_shape(c.shape)]
    if not cases:
        print(f"no {args.family} case with op {args.op!r} and shape containing {args.shape!r}",
              file=sys.stderr)
        return 2
    case = cases[0]
    impls = [i for i in case.impls if i.name == args.impl]
    if not impls:
        print(f"case {harness.format_shape(case.shape)} has no impl {args.impl!r}: "
              f"{[i.name for i in case.impls]}", file=sys.stderr)
        return 2
    inputs = case.make_inputs()
    for _ in range(args.calls):
        impls[0].fn(inputs)
    if machine.cuda:
        torch.cuda.synchronize()
    print(f"ran {args.op} [{args.impl}] {harness.format_shape(case.shape)} x{args.calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
