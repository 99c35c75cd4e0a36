#!/usr/bin/env bash
# Builds bench/topk_standalone.cu (the CUDA top-k of this tree, no torch; ~15 s) and runs it on
# the shapes given (default: the two headline shapes). For an A/B, run the script of a second
# checkout too (git worktree add /tmp/base <sha>): both binaries in one device call.
#   bash bench/topk_standalone.sh [ROWSxLENGTH ...]        K=<k> (default 2048)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${BUILD_DIR:-build/topk_standalone}
mkdir -p "$out"
nvcc -gencode arch=compute_90a,code=sm_90a -O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr \
  -I csrc -I csrc/include -o "$out/topk_standalone" bench/topk_standalone.cu
[ $# -gt 0 ] || set -- 4096x131072 1x131072
"$out/topk_standalone" "$@"
