#!/usr/bin/env bash
# hack/e2e-real-node.sh [--if-possible] [--runtime docker|containerd] [DIR]
#
# End to end on a REAL node, in one command, from a fresh clone on Debian 12 as root:
#   1. a loopback control plane + a real kubelet (hack/start-real-node.sh) on one of two runtimes:
#      docker (default): dockerd + kubelet v1.20.2 (dockershim), pods on docker0;
#      containerd: Debian's containerd 1.6 + kubelet 1.34 over CRI (cgroupfs driver), pods on the CNI
#      bridge hibcni0 (10.88.0.0/24); the images below are built with docker and imported with
#      `docker save | ctr -n k8s.io images import -`, still no registry,
#   2. images built without any registry: local/debian:bookworm (debootstrap, by start-real-node.sh),
#      local/python:3.11-bookworm (python3 + pip from Debian's apt, inside `docker build`), and the
#      project's Dockerfile on it -> local/hibernate:dev, fed a wheelhouse built here (containers do
#      not trust this machine's TLS proxy) and the CRIU bundle of hack/build-criu.sh (prebuilt/README.md),
#   3. `helm install` of ./helm/hibernate with local/hibernate:dev (agent = the chart's privileged,
#      hostPID DaemonSet pod; operator and gateway as the chart's Deployments),
#   4. tests/e2e/walk.py: a ModelDeployment served by the fake engine, walked through L1, L2,
#      Checkpoint and Stop and back to Awake after each, through kubectl; checks the level/phase in
#      `kubectl get md`, the same completion answer after every wake, and across L1/L2/Checkpoint the
#      same pod, pod IP and Service endpoints; Stop takes a snapshot and the wake's new pod (new UID
#      and IP) must be restored from it (--expect-restore), timed against a Stop without one (cold);
#      prints md, pods -o wide and endpoints at every step,
#   4a. tests/e2e/readiness.py: two replicas, one put to sleep by a person: it leaves the Service's
#      ready endpoints; 100 requests to those endpoints and 100 through the gateway, none hangs,
#      none fails; with both asleep the gateway holds a request until one wakes; Stop on one pod,
#   4b. tests/e2e/hostile.py: a hostile engine that replaces its loader, python3 and more with
#      recorders and plants symlinks to host canaries; a Checkpoint cycle and a deletion must give
#      it nothing (docs/security.md),
#   5. cleans up: helm uninstall, the node (start-real-node.sh stop), the iptables rule, the
#      checkpoint directory if it made it, DIR. Images stay in /var/lib/docker for the next run.
#
#   --if-possible   exit 0 with "SKIP: <why>" where this cannot run (not root, no apt candidate for
#                   docker.io (or containerd), a dockerd without the clampoom runtime already running
#                   for the docker walk): for CI.
#   --runtime R     docker (default) or containerd.
# Walks never overlap: each holds /run/lock/hibernate-e2e-real-node.lock (flock) from its start to its
# cleanup (both use the host's kubepods cgroups, the checkpoint root, the API Service's DNAT); a second
# one waits. KEEP=1 lets go of it at exit: stop a kept node before the next walk.
#   KEEP=1          leave everything running and print how to use and stop it.
#   LEVELS=L1,Checkpoint   walk only these levels.
#   SKIP_STEPS=prometheus,readiness,hostile   leave out these runtime-independent steps (CI runs each
#                   on one walk or two, not on all three: hack/test.sh); the walk itself always runs.
#
# What this machine lacks and how it is bridged (shared/testenv/real-node.md has the facts):
# - No kube-proxy: pods reach the API server at the `kubernetes` Service IP 10.0.0.1:443 through one
#   iptables DNAT rule on the pods' bridge (docker0, or hibcni0 for containerd) to the loopback
#   apiserver (route_localnet=1 on it), removed at the end. The apiserver's certificate names
#   10.0.0.1, so in-cluster config works unchanged.
# - No DNS: the walk reaches the engine at its pod IP (docker0 172.17.0.x, hibcni0 10.88.0.x) from this host.
# - Root here lacks CAP_SYS_RESOURCE, so CRIU cannot read the rlimits of a process of another uid
#   (prlimit: EPERM) and a non-root engine fails to dump. The engine image is therefore
#   local/hibernate-engine:dev = local/hibernate:dev with USER 0 (as vLLM's own image runs); the
#   agent, operator and gateway run local/hibernate:dev as the chart says. On a normal node the
#   privileged agent has CAP_SYS_RESOURCE and the stock image works as the engine (ENGINE_IMAGE=...).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HACK=$ROOT/hack
CRI=docker
for a in "$@"; do [ "${prev:-}" = --runtime ] && CRI=$a; prev=$a; done; unset prev
case $CRI in docker|containerd) ;; *) echo "unknown --runtime '$CRI': docker or containerd" >&2; exit 2 ;; esac
# docker: Kubernetes 1.20, whose kubelet's built-in dockershim runs pods on dockerd (gone in 1.24),
# the chart's oldest end (kubeVersion >=1.20); containerd: 1.34 over CRI, as GPU clusters run it
if [ "$CRI" = containerd ]; then export KUBE_TEST_VERSION=${KUBE_TEST_VERSION:-1.34}
else export KUBE_TEST_VERSION=${KUBE_TEST_VERSION:-1.20}; fi
ASSETS="${KUBE_TEST_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/k8s-test-assets/$KUBE_TEST_VERSION}"
export KUBE_TEST_ASSETS=$ASSETS
CRIU_BUNDLE=${HIBERNATE_CRIU_BUNDLE:-${XDG_CACHE_HOME:-$HOME/.cache}/hibernate/criu-4.2}
IMAGE=local/hibernate:dev
ENGINE_IMAGE=${ENGINE_IMAGE:-local/hibernate-engine:dev}
HOSTILE_IMAGE=local/hibernate-hostile-engine:dev
CANARY=/var/lib/hibernate-e2e-canary   # host files the hostile engine's symlinks point at
BASE=local/python:3.11-bookworm
RELEASE=hibernate
RELEASE_NS=hibernate-system
CKPT=/var/lib/hibernate/checkpoints
API_SVC_IP=10.0.0.1       # first IP of start-control-plane.sh's --service-cluster-ip-range 10.0.0.0/24
LOCK=/run/lock/hibernate-e2e-real-node.lock
export DOCKER_BUILDKIT=0  # the legacy builder: offline, local base images, no buildx needed

IF_POSSIBLE=; DIR=
if [ "${1:-}" = --stop ]; then  # after KEEP=1: what the cleanup would have done
  DIR=$(cd "${2:?usage: $0 --stop DIR}" && pwd)
  KC=$DIR/node/kubeconfig
  "$(dirname "$0")/install-helm.sh" >/dev/null 2>&1 && HELM=$("$(dirname "$0")/install-helm.sh" 2>/dev/null)/helm &&
    "$HELM" --kubeconfig "$KC" uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 60s >/dev/null 2>&1 || true
  "$HACK/start-real-node.sh" stop "$DIR/node" || true
  "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/prometheus_check.py" stop --dir "$DIR/prometheus" || true
  read -ra DNAT < "$DIR/dnat" || DNAT=()
  [ "${#DNAT[@]}" = 0 ] || iptables -t nat -D PREROUTING "${DNAT[@]}" 2>/dev/null || true
  BRIDGE=$(cat "$DIR/bridge" 2>/dev/null || echo docker0)
  [ -f "$DIR/route_localnet.orig" ] && cat "$DIR/route_localnet.orig" > "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet" 2>/dev/null || true
  made=$(cat "$DIR/ckpt-made" 2>/dev/null || true); [ -z "$made" ] || rm -rf "$made"
  rm -rf "$DIR"; echo "stopped and removed $DIR"; exit 0
fi
prev=
for a in "$@"; do case $prev:$a in
  --runtime:*) ;; *:--runtime) ;;
  *:--if-possible) IF_POSSIBLE=1 ;; *:-h|*:--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *:-*) echo "unknown flag $a" >&2; exit 2 ;; *) DIR=$a ;; esac; prev=$a; done

T0=${EPOCHREALTIME/./}
elapsed() { local d=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%01d' $((d / 1000000)) $((d % 1000000 / 100000)); }
step() { printf '\n=== %s (t=%ss)\n' "$*" "$(elapsed)"; }
# SKIP_STEPS (see the top): a step named there is left out, with a line saying so.
wants() { case ",${SKIP_STEPS:-}," in *",$1,"*) echo "(left out: SKIP_STEPS has $1)"; return 1 ;; esac; }
case ",${SKIP_STEPS:-}," in ,,) ;; *) for s in ${SKIP_STEPS//,/ }; do case $s in prometheus|readiness|hostile) ;;
  *) echo "unknown SKIP_STEPS entry $s: prometheus, readiness or hostile" >&2; exit 2 ;; esac; done ;; esac
skip_or_die() { if [ -n "$IF_POSSIBLE" ]; then echo "SKIP e2e-real-node: $*"; exit 0; fi; echo "e2e-real-node: $*" >&2; exit 1; }

# --- can it run here? ---
[ "$(id -u)" = 0 ] || skip_or_die "needs root (dockerd, kubelet, CRIU)"
[ "$(uname -m)" = x86_64 ] || skip_or_die "needs x86_64 (the kubelet and helm builds are amd64)"
command -v apt-get >/dev/null || skip_or_die "needs Debian's apt (docker.io, debootstrap)"
if ! command -v dockerd >/dev/null; then
  cand=$(apt-cache policy docker.io 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
    apt-get update -q >/dev/null 2>&1 || true
    cand=$(apt-cache policy docker.io 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  [ -n "$cand" ] && [ "$cand" != "(none)" ] || skip_or_die "docker.io cannot be installed (no apt candidate)"
fi
if [ "$CRI" = containerd ] && ! command -v containerd >/dev/null; then
  cand=$(apt-cache policy containerd 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$cand" ] && [ "$cand" != "(none)" ] || skip_or_die "containerd cannot be installed (no apt candidate)"
fi
if [ "$CRI" = docker ] && docker info >/dev/null 2>&1 && ! docker info --format '{{json .Runtimes}}' | grep -q '"clampoom"'; then
  skip_or_die "a dockerd runs without the clampoom runtime of start-real-node.sh; stop it first"
fi

# --- one walk at a time on this machine; the node's daemons do not inherit the lock (9>&-) ---
exec 9>"$LOCK"
if ! flock -n 9; then
  echo "e2e-real-node: another real-node walk holds $LOCK; waiting for it"
  flock 9
  echo "e2e-real-node: waited $(elapsed) s for $LOCK"
  T0=${EPOCHREALTIME/./}   # the times below are this walk's own
fi

DIR=${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/hibernate-e2e.XXXXXX")}
mkdir -p "$DIR/logs"; DIR=$(cd "$DIR" && pwd)
echo "e2e-real-node: work dir $DIR (logs in $DIR/logs)"

# --- cleanup, whatever happens from here on ---
KC=; DNAT=(); CKPT_MADE=; BRIDGE=docker0
K() { "$ASSETS/kubectl" --kubeconfig "$KC" "$@"; }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "${KEEP:-0}" = 1 ] && [ -n "$KC" ]; then
    printf '\nKEEP=1: left running.\n  export KUBECONFIG=%s\n  kubectl: %s\n  stop: %s --stop %s\n' \
      "$KC" "$ASSETS/kubectl" "$0" "$DIR"
    printf '%s\n' "${DNAT[*]}" > "$DIR/dnat"; printf '%s\n' "$CKPT_MADE" > "$DIR/ckpt-made"
    printf '%s\n' "$BRIDGE" > "$DIR/bridge"
    exit "$rc"
  fi
  step "cleanup"
  if [ -n "$KC" ] && [ -f "$DIR/helm-installed" ]; then
    "$HELM" --kubeconfig "$KC" uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 60s >/dev/null 2>&1 || true
  fi
  [ -d "$DIR/node" ] && { "$HACK/start-real-node.sh" stop "$DIR/node" || true; }
  "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/prometheus_check.py" stop --dir "$DIR/prometheus" 9>&- || true
  teardown_host
  rm -rf "$DIR"
  echo "e2e-real-node: cleaned up after $(elapsed) s; rc $rc"
  exit "$rc"
}
teardown_host() {  # the host changes of this script (not the node's: start-real-node.sh stop does those)
  if [ "${#DNAT[@]}" -gt 0 ]; then iptables -t nat -D PREROUTING "${DNAT[@]}" 2>/dev/null || true; fi
  if [ -f "$DIR/route_localnet.orig" ] && [ -e "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet" ]; then
    cat "$DIR/route_localnet.orig" > "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet" || true; fi
  if [ -n "$CKPT_MADE" ]; then rm -rf "$CKPT_MADE"; fi
  rm -rf "$CANARY"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- prerequisites (each a no-op when already there) ---
step "prerequisites: venv, kubelet, helm, CRIU bundle"
[ -x "$ROOT/.venv/bin/python" ] || "$HACK/setup.sh"
[ -x "$ASSETS/kubelet" ] || WITH_KUBELET=1 "$HACK/install-k8s-test-assets.sh"   # 1.34 builds it anyway
HELM=$("$HACK/install-helm.sh" 2>/dev/null)/helm
[ -x "$CRIU_BUNDLE/bin/criu" ] || "$HACK/build-criu.sh" "$CRIU_BUNDLE"
echo "kubelet $("$ASSETS/kubelet" --version), helm $("$HELM" version --template '{{.Version}}'), $("$CRIU_BUNDLE/bin/criu" --version | head -1)"

# --- the node ---
step "control plane + $CRI + real kubelet (hack/start-real-node.sh --runtime $CRI)"
KC=$("$HACK/start-real-node.sh" --runtime "$CRI" "$DIR/node" 9>&-)
BRIDGE=$(sed -n 's/^BRIDGE=//p' "$DIR/node/env")
CTR_ADDRESS=$(sed -n 's/^CONTAINERD_ADDRESS=//p' "$DIR/node/env")
K get nodes -o wide

# --- images, no registry ---
step "images: $BASE, $IMAGE (project Dockerfile), $ENGINE_IMAGE"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  mkdir -p "$DIR/base"
  cat > "$DIR/base/Dockerfile" <<'EOF'
# python:3.11-slim-bookworm's layout from Debian's own packages: python3 (3.11) and pip, pip usable
# as root like in the official image (no EXTERNALLY-MANAGED), python3/python/pip in /usr/local/bin.
FROM local/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip procps \
 && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && ln -s /usr/bin/python3 /usr/local/bin/python3 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && ln -s /usr/bin/pip3 /usr/local/bin/pip
CMD ["python3"]
EOF
  docker build -t "$BASE" "$DIR/base" >"$DIR/logs/build-base.log" 2>&1 || { tail -20 "$DIR/logs/build-base.log" >&2; exit 1; }
fi
# A build context of our own: the checkout stays untouched, prebuilt/ is filled only here.
CTX=$DIR/ctx
mkdir -p "$CTX/hack" "$CTX/prebuilt/wheels"
cp -a "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/operator" "$CTX/"
cp -a "$ROOT/hack/build-criu.sh" "$CTX/hack/"
cp -a "$CRIU_BUNDLE" "$CTX/prebuilt/criu"
# The wheelhouse for the image's CPython 3.11 (bookworm's, the same as this host's), built here where
# pip trusts the TLS proxy's CA; pip's cache makes the second run fast.
# SOURCE_DATE_EPOCH: the same tree gives the same wheel, byte for byte (its files' times are fixed),
# so docker's layer cache serves the next walk's build and only a changed tree builds again.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800} "$ROOT/.venv/bin/pip" wheel -q "$CTX" -w "$CTX/prebuilt/wheels" >"$DIR/logs/pip-wheel.log" 2>&1 ||
  { tail -20 "$DIR/logs/pip-wheel.log" >&2; exit 1; }
rm -rf "$CTX/build" "$CTX"/operator/*.egg-info
docker build -t "$IMAGE" --build-arg PYTHON_IMAGE="$BASE" "$CTX" >"$DIR/logs/build-image.log" 2>&1 ||
  { tail -30 "$DIR/logs/build-image.log" >&2; exit 1; }
if [ "$ENGINE_IMAGE" = local/hibernate-engine:dev ]; then
  printf 'FROM %s\nUSER 0:0\n' "$IMAGE" | docker build -t "$ENGINE_IMAGE" - >"$DIR/logs/build-engine.log" 2>&1 ||
    { tail -20 "$DIR/logs/build-engine.log" >&2; exit 1; }
fi
# The hostile engine of tests/e2e/hostile.py: the engine image plus recorders that it plants in its
# own container (tests/hostile/recorder.c) and the script that plants them.
mkdir -p "$DIR/hostile"
gcc -O2 -static-pie -nostdlib -fno-stack-protector -o "$DIR/hostile/recorder" "$ROOT/tests/hostile/recorder.c"
gcc -O2 -shared -fPIC -DRECORDER_LIBRARY -o "$DIR/hostile/librecorder.so" "$ROOT/tests/hostile/recorder.c"
cp "$ROOT/tests/e2e/hostile_engine.py" "$DIR/hostile/"
printf 'FROM %s\nCOPY recorder librecorder.so hostile_engine.py /hostile/\n' "$ENGINE_IMAGE" > "$DIR/hostile/Dockerfile"
docker build -t "$HOSTILE_IMAGE" "$DIR/hostile" >"$DIR/logs/build-hostile.log" 2>&1 ||
  { tail -20 "$DIR/logs/build-hostile.log" >&2; exit 1; }
docker images --format 'table {{.Repository}}:{{.Tag}}\t{{.ID}}\t{{.Size}}' | grep -E '^(REPOSITORY|local/)'
docker run --rm --entrypoint sh "$IMAGE" -c 'hibernate --help >/dev/null && /opt/hibernate/criu/bin/criu --version | head -1 && id'
if [ "$CRI" = containerd ]; then  # into containerd's k8s.io namespace, where its CRI plugin looks
  t=${EPOCHREALTIME/./}
  docker save "$IMAGE" "$ENGINE_IMAGE" "$HOSTILE_IMAGE" |
    ctr --address "$CTR_ADDRESS" -n k8s.io images import - >"$DIR/logs/ctr-import.log" 2>&1 ||
    { tail -20 "$DIR/logs/ctr-import.log" >&2; exit 1; }
  echo "imported into containerd in $(( (${EPOCHREALTIME/./} - t) / 1000 )) ms:"
  ctr --address "$CTR_ADDRESS" -n k8s.io images list | awk 'NR == 1 || /local\//' | cut -c1-110
fi

# --- the host bits the node lacks: the kubernetes Service for pods, the checkpoint root ---
step "pods -> API server: DNAT $API_SVC_IP:443 on $BRIDGE to the loopback apiserver; checkpoint root $CKPT"
API_PORT=$(sed -n 's|.*server: "https://127.0.0.1:\([0-9]*\)".*|\1|p' "$KC")
[ -n "$API_PORT" ] || { echo "no apiserver port in $KC" >&2; exit 1; }
cat "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet" > "$DIR/route_localnet.orig"
echo 1 > "/proc/sys/net/ipv4/conf/$BRIDGE/route_localnet"
DNAT=(-i "$BRIDGE" -d "$API_SVC_IP/32" -p tcp --dport 443 -m comment --comment "hibernate-e2e:$DIR"
      -j DNAT --to-destination "127.0.0.1:$API_PORT")
iptables -t nat -I PREROUTING "${DNAT[@]}"
if [ ! -e /var/lib/hibernate ]; then CKPT_MADE=/var/lib/hibernate
elif [ ! -e "$CKPT" ]; then CKPT_MADE=$CKPT; fi
mkdir -p "$CKPT"

# --- the chart ---
step "helm install $RELEASE ./helm/hibernate (image $IMAGE)"
"$HELM" --kubeconfig "$KC" install "$RELEASE" "$ROOT/helm/hibernate" -n "$RELEASE_NS" --create-namespace \
  -f "$ROOT/helm/hibernate/ci/cpu-only-values.yaml" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  --set operator.logFormat=plain --set agent.logFormat=plain >"$DIR/logs/helm.log" 2>&1 ||
  { cat "$DIR/logs/helm.log" >&2; exit 1; }
touch "$DIR/helm-installed"
head -6 "$DIR/logs/helm.log"
if ! { K -n "$RELEASE_NS" rollout status ds/$RELEASE-agent --timeout 180s &&
       K -n "$RELEASE_NS" rollout status deploy/$RELEASE-operator --timeout 180s &&
       K -n "$RELEASE_NS" rollout status deploy/$RELEASE-gateway --timeout 180s; }; then
  K -n "$RELEASE_NS" get pods -o wide; K -n "$RELEASE_NS" describe pods | tail -40
  for c in agent operator gateway; do K -n "$RELEASE_NS" logs -l app.kubernetes.io/component=$c --tail 20 || true; done
  exit 1
fi

# --- a real Prometheus (Debian's) on loopback, scraping the chart's Services' endpoints ---
step "Prometheus: the operator, agent and gateway through the chart's Services (tests/e2e/prometheus_check.py)"
PROM=("$ROOT/.venv/bin/python" "$ROOT/tests/e2e/prometheus_check.py")
prom_rc=0
if wants prometheus; then "${PROM[@]}" start --dir "$DIR/prometheus" --kubectl "$ASSETS/kubectl --kubeconfig $KC" --namespace "$RELEASE_NS" \
  --release "$RELEASE" --helm "$HELM" 9>&- || prom_rc=$?; fi

# --- the walk ---
step "the walk (tests/e2e/walk.py)"
rc=0
"$ROOT/.venv/bin/python" "$ROOT/tests/e2e/walk.py" --kubectl "$ASSETS/kubectl --kubeconfig $KC" \
  --engine-image "$ENGINE_IMAGE" --release-namespace "$RELEASE_NS" ${LEVELS:+--levels "$LEVELS"} \
  --summary-json "$DIR/walk.json" --runtime "$CRI" --expect-restore || rc=$?
step "Prometheus: a query of each level's wake seconds returns the walk's wakes"
if ! wants prometheus; then :
elif [ "$prom_rc" = 0 ]; then "${PROM[@]}" check --dir "$DIR/prometheus" --walk-summary "$DIR/walk.json" || rc=1
else echo "prometheus did not start (above)"; rc=1; fi
step "two replicas, one asleep: no request reaches it (tests/e2e/readiness.py)"
if wants readiness; then "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/readiness.py" --kubectl "$ASSETS/kubectl --kubeconfig $KC" \
  --engine-image "$ENGINE_IMAGE" --release-namespace "$RELEASE_NS" --release "$RELEASE" || rc=1; fi
if [ "$CRI" = docker ]; then   # once per CI run: two fake engines on one node (docs/gpu-sharing.md)
  step "two models take turns on one GpuGroup through the gateway (tests/e2e/gpu_group.py)"
  "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/gpu_group.py" --kubectl "$ASSETS/kubectl --kubeconfig $KC" \
    --engine-image "$ENGINE_IMAGE" --release-namespace "$RELEASE_NS" --release "$RELEASE" || rc=1
fi
step "a hostile engine: a Checkpoint cycle and a deletion give it nothing (tests/e2e/hostile.py)"
if wants hostile; then "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/hostile.py" --kubectl "$ASSETS/kubectl --kubeconfig $KC" \
  --engine-image "$HOSTILE_IMAGE" --release-namespace "$RELEASE_NS" --canary-dir "$CANARY" || rc=1; fi
step "the agent's log (its DaemonSet pod)"
K -n "$RELEASE_NS" logs ds/$RELEASE-agent --tail 400 2>&1 | grep -v 'GET /healthz\|GET /metrics' | tail -25 || true
step "no checkpoint image left after the deletions"
left=$(find "$CKPT/default" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
echo "checkpoint images left under $CKPT/default after the ModelDeployments' deletion: $left"
if [ "$left" != 0 ]; then find "$CKPT/default" -maxdepth 3 | head -20; rc=1; fi
echo "e2e-real-node ($CRI, kubelet $("$ASSETS/kubelet" --version | awk '{print $2}')): $([ "$rc" = 0 ] && echo PASSED || echo FAILED) after $(elapsed) s"
exit "$rc"
