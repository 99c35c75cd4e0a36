#!/usr/bin/env bash
# Builds bench/racecheck_probe.cu, runs each case under compute-sanitizer racecheck and compares
# the verdict with the case's expectation (see the .cu file). Exit status 1 on any mismatch or a
# value that did not arrive. Needs a GPU (sm_90a) and the CUDA toolkit on PATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bin=${TMPDIR:-/tmp}/racecheck_probe
nvcc -arch=sm_90a -O2 -o "$bin" racecheck_probe.cu || exit 1
compute-sanitizer --version | tail -n 1
status=0
while IFS=$'\t' read -r n expect name; do
  # Hazard records: the raw count (the default analysis report groups them, "(1 error, ...").
  log=$(timeout 120 compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 1 \
    "$bin" "$n" 2>&1)
  errors=$(sed -n 's/.*RACECHECK SUMMARY: .*(\([0-9]*\) errors\{0,1\},.*/\1/p' <<<"$log")
  seen=$([ "${errors:-0}" -gt 0 ] && echo race || echo clean)
  value=$(grep -o 'value arrived\|not checked\|WRONG VALUE\|: [a-z ]*error[a-z ]*' <<<"$log" | head -n 1)
  ok=$([ "$seen" = "$expect" ] && echo ok || echo MISMATCH)
  [ "$ok" = ok ] || status=1
  [ "$value" = "WRONG VALUE" ] && status=1
  printf '%2d  %-6s %-8s %-9s %-14s %s\n' "$n" "$seen" "(${errors:-0})" "$ok" "${value:-no output}" "$name"
done < <("$bin" list)
exit $status
