"""Runs one op at one shape a few times, for a profiler to capture (bench/device_run.sh PROFILE).

    ncu --clock-control none -k regex:topk_kernel --launch-skip 2 -c 1 \
        python3 -m bench.profile topk --rows 4096 --len 131072

The inputs are the benchmark's (random normal logits); the calls are not timed here.
"""
from __future__ import annotations

import argparse

import torch

import indexcache_ops as ic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["topk"])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--len", type=int, default=131072)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--sorted", action="store_true")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    logits = torch.randn(args.rows, args.len, device="cuda")
    out = torch.empty(args.rows, args.k, dtype=torch.int32, device="cuda")
    for _ in range(args.calls):
        ic.topk(logits, args.k, sorted=args.sorted, out=out)
    torch.cuda.synchronize()
    print(f"ran {args.op} {args.rows}x{args.len} k={args.k} x{args.calls}")


if __name__ == "__main__":
    main()
