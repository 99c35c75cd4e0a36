#!/usr/bin/env bash
# The one script the lent GPU runs (device tool, from the repo root): carried wheels -> in-place
# build -> GPU tests -> optional compute-sanitizer -> benchmarks; the bench summary and a stage
# table print last, because the reply carries only the end of the output.
#
#   INDEXCACHE_COMMIT=<sha>[-dirty] BENCH=headline bash bench/device_run.sh
#
# Stages, chosen by environment variables so that one call does only what is needed:
#   BUILD=1|0|auto             build the extension in place (default 1; a warm machine keeps build/);
#                              auto: use a carried indexcache_ops/_C*.so (built here from a clean
#                              tree: same torch, nvcc and sm_90a) when it imports and its git sha
#                              is INDEXCACHE_COMMIT's (never for a -dirty commit), else build
#   TESTS=gpu|all|none         pytest -m gpu, the whole suite, or nothing (default gpu)
#   TEST_ARGS="..."            extra pytest words, e.g. "-x --maxfail 3" (split on spaces)
#   TEST_K="expr"              pytest -k expression for the test stage (kept whole: "a or b")
#   SANITIZE=0|1               compute-sanitizer over the GPU tests (default 0)
#   SANITIZE_TOOLS="..."       default "memcheck racecheck"
#   SANITIZE_K="expr"          pytest -k expression naming the ops to sanitise (default: all)
#   RACECHECK_PROBE=0|1        bench/racecheck_probe.sh: what racecheck takes as ordering (default 0)
#   PROFILE="<bench.profile words>[;...]"  Nsight Compute over one benchmark case each, e.g.
#                              "--family topk --op topk --shape rows=1" (--shape: one word)
#   PROFILE_KERNEL=regex       the kernel ncu captures (default: the --op value)
#   BENCH=headline|sweep|none  benchmark shapes (default headline)
#   BENCH_ARGS="..."           extra python -m bench words, e.g. "--families topk --budget 0.5"
#   INDEXCACHE_COMMIT          the commit the JSON records (the device copy has no .git)
#   STAGE_TIMEOUT=<seconds>    kill any stage that runs longer (a hung kernel must not eat the
#                              whole call; 0 = no limit, the default)
# Everything lands in $OUT: one JSON per benchmark family, and logs.tar.gz holding env.log
# build.log tests.log sanitize.log bench.log profile*.{log,txt,csv} (the tool returns 8 files at
# most; logs are capped at 15 MB, keeping their ends).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-$PWD/device_out}
BUILD=${BUILD:-1}
TESTS=${TESTS:-gpu}
SANITIZE=${SANITIZE:-0}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck racecheck}
SANITIZE_K=${SANITIZE_K:-}
BENCH=${BENCH:-headline}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-0}
PY=${PYTHON:-python3}
read -ra test_args <<<"${TEST_ARGS:-}"
read -ra bench_args <<<"${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

stages=()
failed=0
started=$SECONDS

# stage NAME LOG CMD...: run CMD with its output appended to $OUT/LOG; record rc, seconds and the
# log's last line; on failure show the log's tail. Returns CMD's status.
stage() {
  local name=$1 log=$2 start=$SECONDS rc=0
  shift 2
  echo "--- $name: $*" | tee -a "$OUT/$log"
  if [ "$STAGE_TIMEOUT" != 0 ]; then
    timeout --kill-after=10 "$STAGE_TIMEOUT" "$@" >>"$OUT/$log" 2>&1 || rc=$?
  else
    "$@" >>"$OUT/$log" 2>&1 || rc=$?
  fi
  local last
  last=$(grep -v '^[[:space:]]*$' "$OUT/$log" | tail -n 1 | cut -c1-110)
  stages+=("$(printf '%-10s %-7s %5ds  %-13s %s' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" \
    $((SECONDS - start)) "$log" "$last")")
  if [ "$rc" != 0 ]; then
    failed=1
    echo "--- $name FAILED (rc=$rc); last lines of $log:"
    tail -n 40 "$OUT/$log"
  fi
  return "$rc"
}

finish() {
  local rc=$?
  for log in "$OUT"/*.log; do
    if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt 15000000 ]; then
      tail -c 15000000 "$log" >"$log.cut" && mv "$log.cut" "$log"
    fi
  done
  if [ -f "$OUT/bench.log" ]; then
    echo
    sed -n '/^=== summary/,$p' "$OUT/bench.log"
  fi
  # The device tool returns at most 8 files: the logs and profiler reports travel as one archive,
  # so that every benchmark JSON comes back.
  (
    cd "$OUT" || exit 0
    shopt -s nullglob
    texts=(*.log *.txt *.csv)
    if [ "${#texts[@]}" -gt 0 ]; then
      tar czf logs.tar.gz "${texts[@]}" && rm -f "${texts[@]}"
    fi
  )
  echo
  echo "=== stages ($((SECONDS - started)) s; files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' '))"
  printf '%s\n' "${stages[@]+"${stages[@]}"}"
  [ "$rc" = 0 ] && rc=$failed
  exit "$rc"
}
trap finish EXIT

# Toolkit: torch's cu130 build wants nvcc 13.0; the image keeps it under /usr/local/cuda.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  fi
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
    --format=csv || true
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  nvcc --version | tail -n 2 || true
  "$PY" -c 'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  echo "cores: $(nproc)  commit: ${INDEXCACHE_COMMIT:-unset}"
} >"$OUT/env.log" 2>&1 || true
cat "$OUT/env.log"

# Carried wheels (e.g. nvidia-cutlass 4.2.0.0: CMake imports cutlass_library to find its headers).
if compgen -G ".whl/*.whl" >/dev/null; then
  stage wheels build.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$BUILD" = auto ]; then
  BUILD=1
  commit=${INDEXCACHE_COMMIT:-}
  if [ -n "$commit" ] && [ "${commit%-dirty}" = "$commit" ] && compgen -G "indexcache_ops/_C*.so" >/dev/null &&
    "$PY" -c "import sys, indexcache_ops as m; sha = m.build_info()['git_sha']; print('carried extension:', sha); sys.exit(0 if sha.startswith('$commit') or '$commit'.startswith(sha) else 1)" \
      >>"$OUT/build.log" 2>&1; then
    BUILD=0
    stages+=("$(printf '%-10s %-7s %5ds  %-13s %s' carried ok 0 build.log "commit $commit, not rebuilt")")
  fi
fi

if [ "$BUILD" = 1 ]; then
  # setup.py drives CMake (build/temp.*/cmake, incremental on a warm machine); --inplace puts
  # indexcache_ops/_C*.so beside the sources, which `python3 -m ...` from the repo root imports.
  stage build build.log env MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace || exit 1
  stage import build.log "$PY" -c \
    "import indexcache_ops, json; print(json.dumps(indexcache_ops.build_info()))" || exit 1
fi

[ -n "${TEST_K:-}" ] && test_args+=(-k "$TEST_K")
case "$TESTS" in
  gpu) stage tests tests.log "$PY" -m pytest tests -m gpu -q -ra ${test_args[@]+"${test_args[@]}"} || true ;;
  all) stage tests tests.log "$PY" -m pytest tests -q -ra ${test_args[@]+"${test_args[@]}"} || true ;;
  none) ;;
  *) echo "TESTS must be gpu, all or none, not '$TESTS'"; exit 2 ;;
esac

if [ "$SANITIZE" = 1 ]; then
  k_args=()
  [ -n "$SANITIZE_K" ] && k_args=(-k "$SANITIZE_K")
  for tool in $SANITIZE_TOOLS; do
    # No caching allocator under the sanitizer: each tensor is its own allocation, so an
    # out-of-bounds access past a tensor is caught instead of landing in a pooled neighbour.
    stage "$tool" sanitize.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" -m pytest tests -m gpu -q -x -p no:cacheprovider ${k_args[@]+"${k_args[@]}"} || true
  done
fi

if [ "${RACECHECK_PROBE:-0}" = 1 ]; then
  stage probe sanitize.log bash bench/racecheck_probe.sh || true
fi

if [ -n "${PROFILE:-}" ]; then
  # One capture per ';'-separated spec; the third call of each is captured (the first two warm
  # the allocator and the attribute caches). Clocks are left alone (METHOD.md). Only the text
  # reports come back (summary sections, per-SASS-line counters and their sums per kernel line);
  # the .ncu-rep stays in /tmp.
  IFS=';' read -ra profile_specs <<<"$PROFILE"
  n=0
  for spec in "${profile_specs[@]}"; do
    read -ra profile_args <<<"$spec"
    [ "${#profile_args[@]}" = 0 ] && continue
    n=$((n + 1))
    kernel=${PROFILE_KERNEL:-}
    for ((i = 0; i + 1 < ${#profile_args[@]}; ++i)); do
      [ -z "$kernel" ] && [ "${profile_args[i]}" = --op ] && kernel=${profile_args[i + 1]}
    done
    kernel=${kernel:-.}
    stage "profile$n" profile.log ncu --clock-control none --set full --import-source yes \
      -k "regex:$kernel" --launch-skip 2 -c 1 -f -o "/tmp/profile$n" \
      "$PY" -m bench.profile "${profile_args[@]}" || true
    if [ -f "/tmp/profile$n.ncu-rep" ]; then
      ncu --import "/tmp/profile$n.ncu-rep" --page details >"$OUT/profile$n-details.txt" 2>&1 || true
      ncu --import "/tmp/profile$n.ncu-rep" --page source --csv --print-source sass \
        >"$OUT/profile$n-sass.csv" 2>&1 || true
      # The samples per kernel line (bench/sass_lines.py), from the line table of the build here.
      "$PY" -m bench.sass_lines "$OUT/profile$n-sass.csv" indexcache_ops/_C*.so \
        >"$OUT/profile$n-lines.txt" 2>&1 || true
    fi
  done
fi

case "$BENCH" in
  headline) stage bench bench.log "$PY" -m bench --out "$OUT" ${bench_args[@]+"${bench_args[@]}"} || true ;;
  sweep) stage bench bench.log "$PY" -m bench --sweep --out "$OUT" ${bench_args[@]+"${bench_args[@]}"} || true ;;
  none) ;;
  *) echo "BENCH must be headline, sweep or none, not '$BENCH'"; exit 2 ;;
esac
