#!/usr/bin/env bash
# bench/gpu_switch_run.sh [--device cuda|cpu] [--size MIB] [--levels L1,CudaSuspend] [--rounds N]
#                         [--carry DIR] [--budget-s S] [-- ARGS for bench/switch.py]
#
# The GPU switch through the gateway (issue 20, item 6) in one command on the GPU machine, which has
# python3 with torch and no Kubernetes, no kopf and no network: everything else comes from the carry
# directory that bench/pack_carry.sh fills (default .carry/switch; bench/README.md has the device
# call). In order:
#
#   1. unpacks the Kubernetes binaries (etcd, kube-apiserver, kube-controller-manager, kubectl) into
#      a temporary directory and points the tests' control plane at them (KUBE_TEST_ASSETS, and
#      KUBE_TEST_ASSETS_PREBUILT=1: nothing is built or fetched); seeds its certificates from the
#      carry (no openssl needed);
#   2. installs the wheels with pip --no-index into a temporary --target directory that goes first
#      on PYTHONPATH (the machine's own torch stays visible; PYTHON picks the interpreter);
#   3. runs bench/switch.py: two models of one GpuGroup taking turns through the gateway, per
#      makeRoomLevel, by default the reference engine with 16 GiB of weights each on the GPU, L1
#      and CudaSuspend, moved by the agent's own Levels; within --budget-s (540) of the start, the
#      rest of the device's 10 minutes being for the clean-up;
#   4. leaves in $OUT: RESULTS.md (bench/RESULTS.md with the section gpu-switch-gateway added or
#      replaced; written after each level), switch.json, switch.log, system.txt, logs.tar.gz (the
#      control plane's, operator's, gateway's and engines' logs);
#   5. ends every process it started, whatever happened: the bench runs in a process group of its
#      own (timeout's), and the engines (sessions of their own) by the pids the bench recorded.
#
# --device cpu runs the fake engines (with --size 64: the whole chain in ~1 minute), for checking
# the carry on a machine without a GPU; OUT defaults to a new temporary directory.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
T0=$SECONDS
CARRY=.carry/switch; DEVICE=cuda; SIZE=16384; LEVELS=L1,CudaSuspend; ROUNDS=5; BUDGET=540; EXTRA=()
while [ $# -gt 0 ]; do case $1 in
  --device) DEVICE=$2; shift 2 ;;
  --size) SIZE=$2; shift 2 ;;
  --levels) LEVELS=$2; shift 2 ;;
  --rounds) ROUNDS=$2; shift 2 ;;
  --carry) CARRY=$2; shift 2 ;;
  --budget-s) BUDGET=$2; shift 2 ;;
  --) shift; EXTRA=("$@"); break ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "unknown argument $1" >&2; exit 2 ;; esac; done
case $DEVICE in cuda|cpu) ;; *) echo "--device cuda|cpu" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-switch-out.XXXXXX")}
mkdir -p "$OUT"
SECTION=gpu-switch-gateway; [ "$DEVICE" = cuda ] || SECTION=switch-gateway-$DEVICE
log() { printf '[gpu-switch %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { log "$*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-switch.XXXXXX"); SITE=$WORK/site
BENCH_PID=
cleanup() {
  local rc=$? p alive=()
  # the bench's process group: the operator, the gateway and the control plane if it was cut short
  if [ -n "$BENCH_PID" ]; then kill -TERM -- "-$BENCH_PID" 2>/dev/null; sleep 1; kill -KILL -- "-$BENCH_PID" 2>/dev/null; fi
  [ -f "$WORK/bench/k8s/pids" ] && hack/start-control-plane.sh stop "$WORK/bench/k8s" 2>/dev/null
  # the engines, each in a session of its own: by the pids bench/switch.py recorded
  for p in $(cat "$WORK/engine.pids" 2>/dev/null); do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  if [ ${#alive[@]} -gt 0 ]; then
    log "engines still running: ${alive[*]}; ending them"
    if [ "$DEVICE" = cuda ]; then  # a CUDA-suspended engine must get its context back to act on SIGTERM
      PYTHONPATH="$SITE:$ROOT/operator" "$PY" -c 'import sys; from hibernate.agent import cuda
for p in sys.argv[1:]:
    try: cuda.resume_all([int(p)])
    except Exception: pass' "${alive[@]}" 2>/dev/null
    fi
    kill -TERM "${alive[@]}" 2>/dev/null
    for _ in $(seq 100); do
      local left=0; for p in "${alive[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
      [ $left = 0 ] && break; sleep 0.1; done
    kill -KILL "${alive[@]}" 2>/dev/null
  fi
  [ -d "$WORK/bench" ] && tar -C "$WORK/bench" -czf "$OUT/logs.tar.gz" --exclude='etcd' --exclude='pki' . 2>/dev/null
  rm -rf "$WORK"
  log "done (rc $rc) after $((SECONDS - T0)) s; results in $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the Kubernetes binaries -------------------------------------------------------------------
[ -d "$CARRY" ] || die "$CARRY missing: make it with bench/pack_carry.sh and name it in carry"
mkdir -p "$WORK/k8s"
if [ -f "$CARRY/k8s.tar.xz" ]; then xz -dc "$CARRY/k8s.tar.xz" | tar -C "$WORK/k8s" -xf - || die "cannot unpack $CARRY/k8s.tar.xz"
elif [ -f "$CARRY/k8s.tar.zst" ]; then zstd -qdc "$CARRY/k8s.tar.zst" | tar -C "$WORK/k8s" -xf - || die "cannot unpack $CARRY/k8s.tar.zst"
else die "no k8s.tar.xz or k8s.tar.zst in $CARRY"; fi
export KUBE_TEST_ASSETS=$WORK/k8s KUBE_TEST_ASSETS_PREBUILT=1
"$KUBE_TEST_ASSETS/kube-apiserver" --version >/dev/null || die "the carried kube-apiserver does not run here"
# hack/start-control-plane.sh makes certificates with openssl unless DIR/pki has them: seeded from the
# carry, so that a machine without openssl runs it too.
[ -f "$CARRY/pki/sa.pub" ] || die "no pki/ in $CARRY: make it again with bench/pack_carry.sh"
mkdir -p "$WORK/bench/k8s" && cp -r "$CARRY/pki" "$WORK/bench/k8s/pki"
log "Kubernetes binaries: $(ls "$KUBE_TEST_ASSETS" | tr '\n' ' ')($(head -1 "$KUBE_TEST_ASSETS/VERSION" 2>/dev/null))"

# --- 2. the Python packages -------------------------------------------------------------------------
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip"
xz -dc "$CARRY/wheels.tar.xz" | tar -C "$WORK" -xf - || die "cannot unpack $CARRY/wheels.tar.xz"
"$PY" -m pip install -q --no-index --no-cache-dir --disable-pip-version-check --no-warn-script-location \
  --find-links "$WORK/wheels" --target "$SITE" -r "$CARRY/requirements.txt" ||
  die "the wheels in $CARRY do not install on $("$PY" -V 2>&1) (made for: $(sed -n 2p "$CARRY/MANIFEST"))"
export PYTHONPATH="$SITE:$ROOT/operator" PYTHONUNBUFFERED=1
"$PY" -c 'import kopf, kubernetes, pydantic, httpx, prometheus_client, aiohttp, yaml, pytest, hibernate.cli' ||
  die "the packages do not import"
log "python: $("$PY" -V 2>&1) at $(command -v "$PY"), $(ls "$WORK/wheels" | wc -l) wheels installed"

{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  kernel: $(uname -r)  cores: $(nproc)"
  echo "python: $("$PY" -V 2>&1)"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>/dev/null ||
    echo "torch: not importable"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1
  free -g 2>/dev/null | head -2
  echo "carry: $(head -1 "$CARRY/MANIFEST" 2>/dev/null)"
} > "$OUT/system.txt"
if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || die "torch sees no GPU"
  [ "$(id -u)" = 0 ] || log "not root: CudaSuspend (the driver's checkpoint of another process) may be refused"
fi

# --- 3. the bench -----------------------------------------------------------------------------------
cp bench/RESULTS.md "$OUT/RESULTS.md"
left=$((BUDGET - (SECONDS - T0)))
[ "$left" -gt 60 ] || die "only $left s of the budget left"
log "bench/switch.py --device $DEVICE --size $SIZE --levels $LEVELS --rounds $ROUNDS (at most $left s)"
# timeout (without --foreground) puts the bench in a process group of its own and signals the
# whole group: SIGINT first, so the bench stops its engines and control plane, SIGKILL 30 s later.
timeout -s INT -k 30 "$left" "$PY" bench/switch.py --device "$DEVICE" --size "$SIZE" --levels "$LEVELS" \
  --rounds "$ROUNDS" --results "$OUT/RESULTS.md" --section "$SECTION" --json "$OUT/switch.json" \
  --work-dir "$WORK/bench" --pids-file "$WORK/engine.pids" "${EXTRA[@]}" > >(tee "$OUT/switch.log") 2>&1 &
BENCH_PID=$!
wait "$BENCH_PID"; rc=$?
[ $rc = 124 ] && log "the bench ran past its $left s: the levels done are in $OUT/RESULTS.md"
log "section $SECTION of $OUT/RESULTS.md:"
sed -n "/<!-- $SECTION begin -->/,/<!-- $SECTION end -->/p" "$OUT/RESULTS.md"
exit "$rc"
