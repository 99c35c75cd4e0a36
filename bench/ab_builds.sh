#!/usr/bin/env bash
# A/B of prebuilt extension variants in one device call: each variant's GPU tests, then
# interleaved benchmark rounds, so that the machine's drift between calls (~3.5 % on the same
# code, bench/NOTES.md) falls on every variant alike.
#
#   AB_TESTS="sparse_mla" AB_BENCH="--families sparse_mla --impls indexcache" \
#     bash bench/ab_builds.sh .scratch/base .scratch/variant
#
# Each argument is a folder holding an indexcache_ops/_C*.so built on this machine (same torch,
# nvcc and sm_90a as the device) from the tree under test; name every folder in the call's
# `carry`. The .so of each variant is copied into indexcache_ops/ in turn.
#   AB_TESTS="expr"        pytest -m gpu -k expr for each variant (empty: no tests)
#   AB_TEST_PATHS="..."    the test files (default: tests/; a variant branched from an older main
#                          fails tests of host checks added since, so name the kernel's files)
#   AB_SANITIZE="expr"     compute-sanitizer racecheck over pytest -m gpu -k expr (empty: none)
#   AB_BENCH="..."         python -m bench words (default: the sparse_mla headline, indexcache rows)
#   AB_ROUNDS=n            interleaved benchmark rounds (default 2)
# Each round's JSON lands in $OUT/<folder name><round>/; stdout shows each round's summary table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 INDEXCACHE_COMMIT=${INDEXCACHE_COMMIT:-ab}
OUT=${OUT:-$PWD/device_out}
read -ra test_paths <<<"${AB_TEST_PATHS:-tests}"
read -ra bench_args <<<"${AB_BENCH:---families sparse_mla --impls indexcache}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader || true

use() { cp "$1"/_C*.so indexcache_ops/ && echo "== $(basename "$1") $2"; }
for v in "$@"; do
  if [ -n "${AB_TESTS:-}" ]; then
    use "$v" tests
    timeout 300 python3 -m pytest -q -m gpu -k "$AB_TESTS" "${test_paths[@]}" -p no:cacheprovider 2>&1 | tail -n 3
  fi
  if [ -n "${AB_SANITIZE:-}" ]; then
    use "$v" racecheck
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 compute-sanitizer --tool racecheck --print-limit 20 \
      python3 -m pytest -q -m gpu -k "$AB_SANITIZE" "${test_paths[@]}" -p no:cacheprovider 2>&1 |
      grep -E "SUMMARY|passed|failed|rror" | tail -n 5
  fi
done
for round in $(seq "${AB_ROUNDS:-2}"); do
  for v in "$@"; do
    use "$v" "bench round $round"
    timeout 200 python3 -m bench "${bench_args[@]}" --out "$OUT/$(basename "$v")$round" 2>&1 |
      awk '/^=== summary/ {on = 1} on'
  done
done
