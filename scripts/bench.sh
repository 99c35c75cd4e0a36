#!/usr/bin/env bash
# Fresh machine -> installed package -> the headline benchmarks on the local GPU (a labelled CPU
# fallback runs where there is none). Results: bench/results/*.json and a table on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo_root"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install --quiet --no-build-isolation --no-deps -e .
exec python -m bench.run_all "$@"
