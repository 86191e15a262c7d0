#!/usr/bin/env bash
# The one command for the GPU machine: GPU tests, then the sleep/wake bench, results to $OUT.
#
#   bash bench/gpu_run.sh [--quick] [--budget-s N] [--no-tests] [-- more bench/wake.py args]
#   bash bench/gpu_run.sh --snapshot [--quick] [-- more bench/snapshot_restore.py args]
#
# Expects (see bench/README.md): the repository as the working directory's tree, python3 with
# torch, root (CRIU and drop_caches), and the CRIU bundle carried at .carry/criu (built here with
# `hack/build-criu.sh .carry/criu`). Without the bundle, level 4 is skipped, the rest runs.
#
# Time: the device tool allows 10 minutes a command; everything here is planned to end within
# --budget-s (default 540 s): the tests get at most 300 s (the walk through every level in a pod,
# tests/test_gpu_pod.py, with 16 GiB of weights, written once to /var/tmp/hibernate-bench/weights/16g
# where the bench reads them too; 2 GiB with --quick or HIBERNATE_GPU_POD_GIB=2), the bench the rest
# (it skips the steps that would not fit and rewrites RESULTS.md after every step, so a cut run still
# leaves numbers). The bench's "pod" rows (the engine in a simulated pod, the agent's Levels + PodRef,
# levels 1-4, ~60 s) run at 16 GiB only (wake.py --pod-sizes 16, its default), next to the raw rows.
# What lands in $OUT: RESULTS.md, results.json, bench.log, pytest-gpu.log, gpu-pod.json, system.txt,
# engine logs.
#
# --snapshot runs bench/snapshot_restore.py instead of the tests and wake.py (issue 19): the 16 GiB
# reference engine's cold start in a fresh simulated pod, level 4 in place, a snapshot, and its restore
# into a new pod to the first correct token, 3 cycles (~3 minutes; --quick: 2 GiB, 1 cycle). Its
# section snapshot-bench:gpu goes to $OUT/RESULTS.md, every sample to $OUT/snapshot.json, its output
# to $OUT/snapshot.log.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=540
QUICK=()
POD_GIB=${HIBERNATE_GPU_POD_GIB:-16}
TESTS=1
SNAPSHOT=0
EXTRA=()
while (($#)); do
  case $1 in
    --quick) QUICK=(--quick); POD_GIB=${HIBERNATE_GPU_POD_GIB:-2}; shift ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --no-tests) TESTS=0; shift ;;
    --snapshot) SNAPSHOT=1; TESTS=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
OUT=${OUT:-$ROOT/.bench-out}
mkdir -p "$OUT"
# The bench rewrites only its own section, so $OUT/RESULTS.md comes back as bench/RESULTS.md with
# the GPU section added or replaced: copy it over bench/RESULTS.md to keep the results.
[[ -f $OUT/RESULTS.md ]] || cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT/operator${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python wheels of the agent's runtime dependencies that this python lacks, carried at
# .carry/wheels (bench/README.md) and imported from the wheel file itself (zipimport). sniffio above
# all: without it every request the agent makes to an engine costs a search of the import path.
for whl in "$ROOT"/.carry/wheels/*-py3-none-any.whl; do
  [[ -f $whl ]] || continue
  module=$(basename "$whl"); module=${module%%-*}
  "$PY" -c "import $module" 2>/dev/null || PYTHONPATH="$whl:$PYTHONPATH"
done
export PYTHONUNBUFFERED=1
left() { echo $((START + BUDGET - $(date +%s))); }
say() { echo "[gpu_run $(($(date +%s) - START))s] $*"; }

# -- what this machine is ----------------------------------------------------------------------
{
  date -u
  id
  uname -a
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
  "$PY" -c 'import sys, torch; print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
  "$PY" -c 'import httpx; print("httpx", httpx.__version__)' 2>&1 || true
  "$PY" -c 'import anyio, importlib.metadata as m; print("anyio", m.version("anyio"))' 2>&1 || true
  "$PY" -c 'import sniffio; print("sniffio", sniffio.__version__, "from", sniffio.__file__)' 2>&1 || true
  nproc
  free -g
  df -h / /var/tmp /dev/shm 2>&1
  grep -E ' / | /var | /tmp | /dev/shm ' /proc/mounts || true
} >"$OUT/system.txt" 2>&1
say "system: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"

# -- CRIU bundle ----------------------------------------------------------------------------------
# No CRIU plugin and no cuda-checkpoint: the agent (and the bench) checkpoint CUDA around criu.
BUNDLE=$ROOT/.carry/criu
if [[ -x $BUNDLE/bin/criu ]]; then
  export HIBERNATE_CRIU=$BUNDLE
  {
    "$BUNDLE/bin/criu" --version
    "$BUNDLE/bin/criu" check
    ls -la "$BUNDLE/bin" "$BUNDLE/lib"
  } >>"$OUT/system.txt" 2>&1
  say "CRIU bundle at $BUNDLE: $("$BUNDLE/bin/criu" --version 2>&1 | head -1)"
else
  say "no CRIU bundle at $BUNDLE (carry .carry/criu, built by hack/build-criu.sh .carry/criu): level 4 will be skipped"
fi

# -- GPU tests -----------------------------------------------------------------------------------
# tests/test_gpu_pod.py: the reference engine in a simulated pod given the GPU's device nodes, moved
# through every level by the agent's own Levels (a real PodRef), then a failed in-pod restore.
POD_PIDS=/var/tmp/hibernate-bench/gpu-pod.pids
if ((TESTS)); then
  LIMIT=$(($(left) < 300 ? $(left) : 300))
  say "GPU tests (limit ${LIMIT}s; the pod walk with ${POD_GIB} GiB)"
  rm -f "$POD_PIDS"
  HIBERNATE_GPU_TEST_GIB=${HIBERNATE_GPU_TEST_GIB:-2} HIBERNATE_GPU_POD_GIB=$POD_GIB OUT=$OUT timeout -k 10 "$LIMIT" \
    "$PY" -m pytest --noconftest -p no:cacheprovider -m gpu -rs \
    tests/test_cuda.py tests/test_reference_engine.py tests/test_gpu_pod.py -s \
    >"$OUT/pytest-gpu.log" 2>&1
  say "GPU tests rc $?: $(tail -1 "$OUT/pytest-gpu.log")"
  grep -a '^\[gpu-pod\]' "$OUT/pytest-gpu.log" | grep -v '^\[gpu-pod\] JSON' | cut -c1-400
  # A pytest cut by the limit may leave its pod: end it by the init pids the test recorded, each
  # checked to still be a pod init, before the bench measures the card.
  if [[ -f $POD_PIDS ]]; then
    while read -r pid; do
      if grep -qa podinit.py "/proc/$pid/cmdline" 2>/dev/null; then
        say "ending the pod of init $pid, left by the tests"
        kill -9 "$pid" 2>/dev/null || true
      fi
    done <"$POD_PIDS"
    rm -f "$POD_PIDS"
  fi
fi

# -- the bench -----------------------------------------------------------------------------------
DEADLINE=$((START + BUDGET))
if ((SNAPSHOT)); then
  say "snapshot bench: $(left)s left"
  SIZE=()
  ((${#QUICK[@]})) && SIZE=(--size 2 --cycles 1)
  timeout -k 10 $(($(left) + 30)) "$PY" bench/snapshot_restore.py --device cuda:0 --deadline "$DEADLINE" \
    --results "$OUT/RESULTS.md" --json "$OUT/snapshot.json" --log-dir "$OUT/engine-logs" \
    "${SIZE[@]}" "${EXTRA[@]}" 2>&1 | tee "$OUT/snapshot.log"
  RC=${PIPESTATUS[0]}
  say "snapshot bench rc $RC"
else
  say "bench: $(left)s left"
  timeout -k 10 $(($(left) + 30)) "$PY" bench/wake.py --device cuda:0 --deadline "$DEADLINE" --cold \
    --results "$OUT/RESULTS.md" --json "$OUT/results.json" --log-dir "$OUT/engine-logs" \
    "${QUICK[@]}" "${EXTRA[@]}" 2>&1 | tee "$OUT/bench.log"
  RC=${PIPESTATUS[0]}
  say "bench rc $RC"
fi

# Leave no engine running (a bench cut by the timeout leaves its engine): the pids it recorded,
# each checked to still be a reference engine, or (its pod rows) a pod init. The weights stay in
# /var/tmp for a rerun.
if [[ -f $OUT/engine-logs/pod.pids ]]; then
  while read -r pid; do
    if grep -qa podinit.py "/proc/$pid/cmdline" 2>/dev/null; then
      say "ending the pod of init $pid, left by the bench"
      kill -9 "$pid" 2>/dev/null || true
    fi
  done <"$OUT/engine-logs/pod.pids"
fi
if [[ -f $OUT/engine-logs/engine.pids ]]; then
  while read -r pid; do
    if grep -q hibernate.engine.reference "/proc/$pid/cmdline" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done <"$OUT/engine-logs/engine.pids"
fi
rm -rf /dev/shm/hibernate-bench
say "done; results in $OUT"
exit "$RC"
