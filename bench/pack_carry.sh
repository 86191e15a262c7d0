#!/usr/bin/env bash
# bench/pack_carry.sh [--out .carry/switch] [--python 3.12]... [--zstd]
#
# Fills a carry directory (git-ignored, .carry/) with what bench/gpu_switch_run.sh needs on the GPU
# machine, which has python3 with torch and nothing of Kubernetes, and no network:
#
#   k8s.tar.xz        etcd, kube-apiserver, kube-controller-manager and kubectl of the tests'
#                     Kubernetes ($KUBE_TEST_ASSETS, else ~/.cache/k8s-test-assets/$KUBE_TEST_VERSION,
#                     1.34; hack/install-k8s-test-assets.sh builds them), one solid xz. No scheduler:
#                     the switch bench starts its control plane without one (the agent stand-in
#                     plays the kubelet; its pods need no node). kubemark, kubelet, kubeadm stay.
#   wheels.tar.xz     a wheelhouse (wheels/) of hibernate's runtime dependencies and pytest (the
#                     tests' helpers import it), each pinned to the version this checkout's .venv
#                     runs, for CPython --python (default 3.12: the GPU machine's python3 is 3.12.3
#                     by /work/.library/device/KINDS.md) on manylinux x86_64, binary wheels only
#                     (pip download --only-binary=:all:). Repeat --python for several versions.
#   requirements.txt  the pins: the runner installs them with pip --no-index --find-links wheels/,
#                     so a missing or mismatched wheel stops it at once, not at an import.
#   pki/              the control plane's throwaway CA, serving certificate, service-account keys
#                     and token (hack/start-control-plane.sh makes them with openssl, which the GPU
#                     machine may lack; the runner seeds them).
#   MANIFEST          what is in it, and for which Python; k8s.sha256 the binaries' digests.
#
# Prints the sizes, and the total that would travel with the tree (and .carry/criu if present)
# against the device's 64 MiB. Needs the network (pip) once; idempotent (rebuilds its output).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUTDIR=.carry/switch; PYS=(); COMP=xz
while [ $# -gt 0 ]; do case $1 in
  --out) OUTDIR=$2; shift 2 ;;
  --python) PYS+=("$2"); shift 2 ;;
  --zstd) COMP=zstd; shift ;;
  -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "unknown argument $1" >&2; exit 2 ;; esac; done
[ ${#PYS[@]} -gt 0 ] || PYS=(3.12)
log() { printf '[pack-carry %3ds] %s\n' "$SECONDS" "$*" >&2; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
bytes() { du -sb "$@" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }

ASSETS="${KUBE_TEST_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/k8s-test-assets/${KUBE_TEST_VERSION:-1.34}}"
BINS=(etcd kube-apiserver kube-controller-manager kubectl)
for b in "${BINS[@]}"; do
  [ -x "$ASSETS/$b" ] || { echo "$ASSETS/$b missing: run hack/install-k8s-test-assets.sh first" >&2; exit 1; }
done
VENV_PY=$ROOT/.venv/bin/python
[ -x "$VENV_PY" ] || { echo "no .venv: run hack/setup.sh first (the pins come from it)" >&2; exit 1; }

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/pack-carry.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/k8s" "$STAGE/out"

# --- the Kubernetes binaries -----------------------------------------------------------------------
# One solid tar, xz with a dictionary larger than the tar: the four Go binaries share most of their
# code (client-go, apimachinery, ...), which a dictionary of the default 64 MiB cannot see across
# binaries: 282 MB -> 35 MiB (6 minutes on one core, 3 GB of memory; decompressing needs 384 MiB).
# Reused when the binaries have not changed (k8s.sha256).
for b in "${BINS[@]}"; do cp "$ASSETS/$b" "$STAGE/k8s/"; done
[ -f "$ASSETS/VERSION" ] && cp "$ASSETS/VERSION" "$STAGE/k8s/"
(cd "$STAGE/k8s" && sha256sum "${BINS[@]}") > "$STAGE/out/k8s.sha256"
if [ "$COMP" = xz ] && [ -f "$OUTDIR/k8s.tar.xz" ] && cmp -s "$OUTDIR/k8s.sha256" "$STAGE/out/k8s.sha256"; then
  log "the binaries are unchanged: reusing $OUTDIR/k8s.tar.xz"
  cp "$OUTDIR/k8s.tar.xz" "$STAGE/out/"
elif [ "$COMP" = zstd ]; then
  log "compressing ${BINS[*]} from $ASSETS (zstd -19, 512 MiB window)"
  tar -C "$STAGE/k8s" -cf - . | zstd -q -19 --long=29 -T1 -o "$STAGE/out/k8s.tar.zst"
else
  log "compressing ${BINS[*]} from $ASSETS (xz -9e, 384 MiB dictionary; ~6 minutes)"
  tar -C "$STAGE/k8s" -cf - . | xz -T1 --lzma2=preset=9e,dict=384MiB > "$STAGE/out/k8s.tar.xz"
fi

# --- the control plane's certificates ----------------------------------------------------------------
# hack/start-control-plane.sh makes its CA, serving certificate, service-account keys and token with
# openssl unless DIR/pki has them: made here by that script (etcd and kube-apiserver started once on
# loopback and stopped), so that the GPU machine needs no openssl. A throwaway CA for 127.0.0.1.
log "certificates for the control plane (hack/start-control-plane.sh, once)"
KUBE_TEST_ASSETS=$ASSETS hack/start-control-plane.sh "$STAGE/cp" >/dev/null 2>"$STAGE/cp.log" ||
  { cat "$STAGE/cp.log" >&2; exit 1; }
hack/start-control-plane.sh stop "$STAGE/cp"
mkdir -p "$STAGE/out/pki"
for f in ca.crt ca.key apiserver.crt apiserver.key sa.key sa.pub tokens.csv; do cp "$STAGE/cp/pki/$f" "$STAGE/out/pki/"; done

# --- the Python packages -----------------------------------------------------------------------------
# The runtime closure of hibernate (its [project] dependencies, recursively) plus pytest, as
# installed in .venv: names and versions from importlib.metadata, extras and markers honoured for
# this interpreter (the markers that matter here are the same on 3.11 and 3.12: none of the closure
# is pinned by python_version).
log "pins from .venv (hibernate's runtime closure + pytest)"
"$VENV_PY" - > "$STAGE/out/requirements.txt" <<'PY'
import re
from importlib import metadata
from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

seen, todo = {}, [("hibernate", ()), ("pytest", ())]
while todo:
    name, extras = todo.pop()
    dist = metadata.distribution(name)
    key = norm(dist.metadata["Name"])
    if key in seen and not extras:
        continue
    seen[key] = dist.version
    for spec in dist.requires or []:
        req = Requirement(spec)
        env_ok = req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in (extras or ("",))
        )
        if env_ok:
            todo.append((req.name, tuple(req.extras)))
seen.pop("hibernate")
for key in sorted(seen):
    print(f"{key}=={seen[key]}")
PY
log "$(wc -l < "$STAGE/out/requirements.txt") packages; pip download for CPython ${PYS[*]}"
mkdir -p "$STAGE/wheels"
for py in "${PYS[@]}"; do
  abi=cp${py/./}
  "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$STAGE/wheels" -r "$STAGE/out/requirements.txt"
done
# Wheels are zips, each member deflated on its own: stored again without compression (same members,
# same order; RECORD's hashes are of the contents, so pip checks them as before) and xz'd as one
# tar they take half the room (the kubernetes client is thousands of similar generated files).
log "wheels: $(ls "$STAGE/wheels" | wc -l) files, $(mib "$(bytes "$STAGE/wheels")"); re-stored and xz'd"
"$VENV_PY" - "$STAGE/wheels" <<'PY'
import sys, zipfile
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    stored = wheel.with_suffix(".stored")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    stored.replace(wheel)
PY
tar -C "$STAGE" -cf - wheels | xz -T1 -9e > "$STAGE/out/wheels.tar.xz"

# --- MANIFEST, then swap it in ----------------------------------------------------------------------
{
  echo "made by bench/pack_carry.sh $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)"
  echo "for CPython ${PYS[*]} (manylinux x86_64); unpacked by bench/gpu_switch_run.sh"
  echo "kubernetes: $(head -1 "$STAGE/k8s/VERSION" 2>/dev/null || echo '?'); binaries: ${BINS[*]}"
  (cd "$STAGE/k8s" && for b in "${BINS[@]}"; do printf '  %-26s %s\n' "$b" "$(mib "$(bytes "$b")")"; done)
  (cd "$STAGE/out" && ls -1 k8s.tar.* wheels.tar.xz)
  echo "wheels:"; (cd "$STAGE/wheels" && ls -1 | sed 's/^/  /')
} > "$STAGE/out/MANIFEST"
mkdir -p "$(dirname "$OUTDIR")"
rm -rf "$OUTDIR"; mv "$STAGE/out" "$OUTDIR"

# --- sizes --------------------------------------------------------------------------------------------
raw=$(bytes "$STAGE/k8s"); k8s=$(bytes "$OUTDIR"/k8s.tar.*); whl=$(bytes "$OUTDIR/wheels.tar.xz"); all=$(bytes "$OUTDIR")
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | awk 'END { print $1 }')
criu=$(bytes .carry/criu)
limit=$((64 * 1048576)); sum=$((tree + all))
echo "carry $OUTDIR: $(mib "$all")  (Kubernetes $(mib "$k8s"), from $(mib "$raw"); wheels $(mib "$whl"), $(ls "$STAGE/wheels" | wc -l) files, from $(mib "$(bytes "$STAGE/wheels")") stored)"
echo "the working tree that travels: $(mib "$tree"); with $OUTDIR: $(mib "$sum") of 64 MiB"
if [ "$criu" -gt 0 ]; then
  echo "with .carry/criu ($(mib "$criu")) too: $(mib $((sum + criu))) of 64 MiB"
fi
[ "$sum" -le "$limit" ] || { echo "over the device's 64 MiB: split the carry (see bench/README.md)" >&2; exit 1; }
