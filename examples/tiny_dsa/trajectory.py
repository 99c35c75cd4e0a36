"""What the greedy search's trajectory says about a tiny DSA run (its results.json): the loss after
each flip, how many layers go Shared almost for free, and whether the cost of a pattern is the
sum of its layers' single-flip costs. No model, no GPU: it reads what train.py wrote.

    python examples/tiny_dsa/trajectory.py bench/results/tiny_dsa*/results.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

FREE_PCT = 0.2  # a flip "costs almost nothing" while the calibration loss stays within this


def summarise(results: dict) -> dict:
    search = results["search"]
    base = search["baseline_loss"]
    steps = search["steps"]
    single = {int(layer): 100 * (loss - base) / base
              for layer, loss in steps[0]["candidates"].items()}
    layers = results["config"]["model"]["n_layers"]
    trajectory = [{"flipped": s["flipped"], "delta_pct": 100 * (s["loss"] - base) / base}
                  for s in steps]
    free = next((i for i, s in enumerate(trajectory) if s["delta_pct"] > FREE_PCT),
                len(trajectory))
    retentions = {}
    # The searched patterns train.py evaluated (retention name, Full layers kept) are in the run.
    searched = [r for r in results["heldout"]["rows"] if r["name"] == "searched"]
    for name, num_full in ((r["retention"], r["num_full"]) for r in searched):
        flips = layers - num_full
        if 0 < flips <= len(trajectory):
            retentions[name] = {
                "flips": flips,
                "measured_pct": trajectory[flips - 1]["delta_pct"],
                "sum_of_single_flips_pct": sum(single[s["flipped"]] for s in trajectory[:flips]),
            }
    return {"layers": layers, "calibration_all_full": base, "trajectory": trajectory,
            "free_flips": free, "retentions": retentions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.results:
        s = summarise(json.loads(path.read_text()))
        print(f"{path}: {s['layers']} layers, calibration loss all-Full "
              f"{s['calibration_all_full']:.4f}")
        print("  greedy flips (layer: calibration loss vs all-Full): "
              + " ".join(f"{t['flipped']}:{t['delta_pct']:+.2f}%" for t in s["trajectory"]))
        print(f"  flips within {FREE_PCT} %: {s['free_flips']} of {len(s['trajectory'])}")
        for name, r in s["retentions"].items():
            print(f"  {name}: {r['flips']} flips, measured {r['measured_pct']:+.2f} %, sum of the "
                  f"same layers' single-flip costs {r['sum_of_single_flips_pct']:+.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
