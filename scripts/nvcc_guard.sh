#!/usr/bin/env bash
# CUDA compiler launcher (CMakeLists.txt): runs one nvcc command and fails it when ptxas reports
# that it serialised a kernel's wgmma (C7518 "wgmma.mma_async instructions are serialized", an
# info line, not a warning). Such a kernel builds and passes every test but runs slower: session
# 16's sparse MLA prefill dropped from 484 to 385 TFLOP/s over one misplaced warpgroup wait.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$@" 2>"$log"
rc=$?
cat "$log" >&2
if grep -q "wgmma.mma_async instructions are serialized" "$log"; then
  echo "error: ptxas serialised wgmma (see the C75xx line above); fix the kernel, do not ship it" >&2
  exit 1
fi
exit "$rc"
