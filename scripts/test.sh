#!/usr/bin/env bash
# Fresh machine -> installed package -> test suite. What .ci/run calls.
# GPU tests run where a CUDA GPU is visible and skip cleanly elsewhere.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo_root"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install --quiet --no-build-isolation --no-deps -e .
python -c "import indexcache_ops, json; print(json.dumps(indexcache_ops.build_info()))"
exec python -m pytest tests -q -ra "$@"
