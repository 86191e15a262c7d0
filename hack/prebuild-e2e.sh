#!/usr/bin/env bash
# hack/prebuild-e2e.sh: what the CI walks would build on a fresh machine and that needs no dockerd,
# built ahead: Kubernetes 1.20 with its kubelet (the docker walk, hack/e2e-real-node.sh), and kind,
# crictl and the kind node's root filesystem (hack/kind-node-image.sh --prefetch). hack/test.sh runs
# it in CI beside pytest, at the lowest CPU and IO priority: pytest leaves about one of the two cores
# idle (waits on the API server, on engines, on `eventually`), and these builds take about 9 minutes
# of a fresh run (docs/e2e.md, "CI times"). On a warm machine every step finds its cache and it ends
# at once. hack/test.sh waits for it before the first walk, so no walk builds the same thing beside it.
set -euo pipefail
HACK=$(cd "$(dirname "$0")" && pwd)
log() { printf '[prebuild-e2e %4ds] %s\n' "$SECONDS" "$*"; }
[ "$(id -u)" = 0 ] || { log "not root: nothing built ahead (the walks need root anyway)"; exit 0; }
rc=0
ASSETS=${XDG_CACHE_HOME:-$HOME/.cache}/k8s-test-assets/1.20
if [ -x "$ASSETS/kubelet" ]; then
  log "Kubernetes 1.20 with its kubelet: cached in $ASSETS"
else
  log "Kubernetes 1.20 with its kubelet (hack/install-k8s-test-assets.sh)"
  KUBE_TEST_VERSION=1.20 WITH_KUBELET=1 "$HACK/install-k8s-test-assets.sh" || rc=1
fi
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || export PATH=/usr/local/go/bin:$PATH
if command -v go >/dev/null; then
  log "kind, crictl, the kind node's root filesystem (hack/kind-node-image.sh --prefetch)"
  "$HACK/kind-node-image.sh" --prefetch || rc=1
fi
log "done (rc $rc)"
exit "$rc"
