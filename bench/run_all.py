"""Run the ceilings and every benchmark family; one JSON per family, the summary table last.

    python -m bench [--sweep] [--families indexer,topk,sparse_mla] [--ops ...] [--impls ...]
                    [--out DIR] [--budget SECONDS] [--graph auto|on|off]

Default: the headline shapes only, JSON into bench/results/. On a machine without CUDA it runs
the labelled CPU fallback (tiny shapes, ceilings null).
"""
from __future__ import annotations

import sys

from bench import bench_indexer, bench_sparse_mla, bench_topk, harness

FAMILIES = [bench_indexer, bench_topk, bench_sparse_mla]


def main(argv: list[str] | None = None) -> int:
    return harness.main(FAMILIES, argv)


if __name__ == "__main__":
    sys.exit(main())
