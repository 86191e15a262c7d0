#!/usr/bin/env bash
# hack/e2e-kind.sh [--if-possible] [DIR]      hack/e2e-kind.sh --stop DIR   (after KEEP=1)
#
# The end-to-end walk of hack/e2e-real-node.sh on a kind cluster (Kubernetes 1.34), built without any
# container registry, in one command on Debian 12 as root (docs/e2e.md, "On kind"):
#   1. kind from the Go module proxy and a node image of our own (hack/kind-node-image.sh: debootstrap
#      rootfs + kind's base files + Debian's containerd/runc/CNI plugins + the Kubernetes 1.34 binaries
#      of hack/install-k8s-test-assets.sh + the control plane's images built FROM scratch), cached in
#      ~/.cache/hibernate-kind,
#   2. a dockerd (Debian's docker.io; the running one when it can serve kind, else one started here
#      and stopped at the end), the images of hack/e2e-real-node.sh (tagged :kind: local/hibernate and the
#      engine's), `kind create cluster` with that node image, `kind load docker-image`,
#   3. `helm install` of ./helm/hibernate, then tests/e2e/walk.py (L1, L2, Checkpoint, Stop: restored
#      from its snapshot, --expect-restore, then a cold Stop for the comparison), a real
#      Prometheus beside it (tests/e2e/prometheus_check.py), tests/e2e/readiness.py and tests/e2e/hostile.py,
#   4. cleanup: kind delete cluster, the host route, the sysctls the node's kubelet changed, the node's
#      leftover cgroups, the dockerd if it was started here. Images stay in docker for the next run.
#
#   --if-possible   exit 0 with "SKIP e2e-kind: <why>" where this cannot run (CI).
#   KEEP=1          leave the cluster running and print how to use it and `hack/e2e-kind.sh --stop DIR`.
#   LEVELS=L1,Checkpoint   walk only these levels.  CLUSTER=name (default hibernate-e2e).
#   SKIP_STEPS=prometheus,readiness,hostile   leave out these runtime-independent steps (CI runs each
#                   on one walk or two, not on all three: hack/test.sh); the walk itself always runs.
#
# How the cluster differs from kind's default (each is a registry image we do not have):
# - no CNI add-on (kindnetd): disableDefaultCNI, and the node image carries a bridge CNI config;
# - no kube-proxy (kubeProxyMode: none): one DNAT rule in the node sends the `kubernetes` Service IP
#   10.96.0.1:443 to the API server (what hack/e2e-real-node.sh does on docker0);
# - no CoreDNS (kubeadm's addon/coredns phase is skipped): nothing in the chart or the walk resolves
#   names; no local-path-provisioner (a StorageClass only).
# The host reaches the pod IPs through one route (10.244.0.0/24 via the node's IP), so the walk,
# Prometheus and the readiness step talk to pods as on the real node.
# tests/e2e/hostile.py runs with --node-root /proc/<node pid>/root: the agent's "host" is the node
# container, so the canaries, the checkpoint root and the recorders' log are the node's.
# Root on the project's machines lacks CAP_SYS_RESOURCE: kind's privileged node then needs the runc
# wrapper of hack/start-real-node.sh (dockerd runtime "clampoom"), and the node's containerd runs with
# restrict_oom_score_adj. The engine runs as root (local/hibernate-engine:kind = the image + USER 0), as on
# the real node; ENGINE_IMAGE=local/hibernate:kind runs the stock image as the engine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HACK=$ROOT/hack
CACHE=${HIBERNATE_KIND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hibernate-kind}
export K8S_ASSETS=${K8S_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/k8s-test-assets/1.34}
CRIU_BUNDLE=${HIBERNATE_CRIU_BUNDLE:-${XDG_CACHE_HOME:-$HOME/.cache}/hibernate/criu-4.2}
CLUSTER=${CLUSTER:-hibernate-e2e}
NODE=$CLUSTER-control-plane   # kind's name for the single node's container
# tags of their own: hack/e2e-real-node.sh builds :dev from the same Dockerfile (the layers are shared)
IMAGE=local/hibernate:kind
ENGINE_IMAGE=${ENGINE_IMAGE:-local/hibernate-engine:kind}
HOSTILE_IMAGE=local/hibernate-hostile-engine:kind
CANARY=/var/lib/hibernate-e2e-canary   # in the node: the agent's "host" there
BASE=local/python:3.11-bookworm
RELEASE=hibernate
RELEASE_NS=hibernate-system
POD_SUBNET=10.244.0.0/24   # the node image's bridge CNI config (hack/kind-node-image.sh)
API_SVC_IP=10.96.0.1       # kind's service subnet 10.96.0.0/16
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops)  # the kubelet sets these
LOCK=/tmp/hibernate-e2e.lock   # one kubelet-starting e2e at a time on this machine
export DOCKER_BUILDKIT=0

IF_POSSIBLE=; DIR=; STOP=
for a in "$@"; do case $a in
  --if-possible) IF_POSSIBLE=1 ;; --stop) STOP=1 ;; -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -*) echo "unknown flag $a" >&2; exit 2 ;; *) DIR=$a ;; esac; done

T0=${EPOCHREALTIME/./}
elapsed() { local d=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%01d' $((d / 1000000)) $((d % 1000000 / 100000)); }
step() { printf '\n=== %s (t=%ss)\n' "$*" "$(elapsed)"; }
# SKIP_STEPS (see the top): a step named there is left out, with a line saying so.
wants() { case ",${SKIP_STEPS:-}," in *",$1,"*) echo "(left out: SKIP_STEPS has $1)"; return 1 ;; esac; }
case ",${SKIP_STEPS:-}," in ,,) ;; *) for s in ${SKIP_STEPS//,/ }; do case $s in prometheus|readiness|hostile) ;;
  *) echo "unknown SKIP_STEPS entry $s: prometheus, readiness or hostile" >&2; exit 2 ;; esac; done ;; esac
skip_or_die() { if [ -n "$IF_POSSIBLE" ]; then echo "SKIP e2e-kind: $*"; exit 0; fi; echo "e2e-kind: $*" >&2; exit 1; }

# --- can it run here? ---
[ "$(id -u)" = 0 ] || skip_or_die "needs root (dockerd, kind's privileged node)"
[ "$(uname -m)" = x86_64 ] || skip_or_die "needs x86_64"
# Go: on PATH, else where the machine's Go lives (a non-interactive shell may not have it on PATH)
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || export PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null || skip_or_die "needs Go >= 1.24 on PATH (kind, crictl and Kubernetes come from the Go module proxy)"
command -v apt-get >/dev/null || skip_or_die "needs Debian's apt (docker.io, debootstrap)"
if ! command -v dockerd >/dev/null; then
  cand=$(apt-cache policy docker.io 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
    apt-get update -q >/dev/null 2>&1 || true
    cand=$(apt-cache policy docker.io 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  [ -n "$cand" ] && [ "$cand" != "(none)" ] || skip_or_die "docker.io cannot be installed (no apt candidate)"
fi
# CAP_SYS_RESOURCE (bit 24) missing from root's bounding set: a privileged container needs the wrapper
bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
NEED_CLAMP=; (( (16#$bnd >> 24) & 1 )) || NEED_CLAMP=1

[ -z "$STOP" ] || [ -d "$DIR" ] || { echo "usage: $0 --stop DIR (the work dir a KEEP=1 run printed)" >&2; exit 2; }
exec 9>"$LOCK"
if [ -z "$STOP" ] && ! flock -n 9; then
  echo "e2e-kind: waiting for $LOCK (another e2e run)"; flock 9
  echo "e2e-kind: waited $(elapsed) s for the lock; the times below start now"; T0=${EPOCHREALTIME/./}
fi

DIR=${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/hibernate-kind-e2e.XXXXXX")}
mkdir -p "$DIR/logs"; DIR=$(cd "$DIR" && pwd)
echo "e2e-kind: work dir $DIR (logs in $DIR/logs)"

# --- cleanup, whatever happens from here on ---
KC=$DIR/kubeconfig; KIND=$CACHE/bin/kind; NODE_ID=; ROUTE=; HELM=; NETWORK_MADE=
K() { "$K8S_ASSETS/kubectl" --kubeconfig "$KC" "$@"; }
KEPT=$CACHE/kept-$CLUSTER   # written by a KEEP=1 run: the work dir of the cluster it left running
delete_cluster() {  # NODE_ID: the node container's id (its cgroups)
  "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  # systemd in the node is killed, not stopped: remove the cgroups it left (cgroup v1, private cgroupns)
  for c in /sys/fs/cgroup/*/docker/"$1"; do [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null; done || true
}
teardown() {  # what this script changed; the state is in DIR too, for --stop after KEEP=1
  "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/prometheus_check.py" stop --dir "$DIR/prometheus" 2>/dev/null || true
  [ -z "$ROUTE" ] || ip route del $ROUTE 2>/dev/null || true
  [ -z "$NODE_ID" ] || { delete_cluster "$NODE_ID"; rm -f "$KEPT"; }
  [ -z "$NETWORK_MADE" ] || docker network rm kind >/dev/null 2>&1 || true   # kind's docker network, if it made it
  if [ -f "$DIR/sysctl.orig" ]; then sysctl -q -p "$DIR/sysctl.orig" >/dev/null 2>&1 || true; fi
  if [ -f "$DIR/dockerd.pid" ]; then
    p=$(cat "$DIR/dockerd.pid"); kill "$p" 2>/dev/null || true
    for _ in $(seq 200); do [ -e "/proc/$p" ] || break; sleep 0.1; done
  fi
  rm -rf "$DIR"
}
if [ -n "$STOP" ]; then  # after KEEP=1
  [ -f "$DIR/state" ] || { echo "no $DIR/state: not a kept hack/e2e-kind.sh run" >&2; exit 1; }
  . "$DIR/state"; teardown; echo "e2e-kind: deleted cluster $CLUSTER and removed $DIR"; exit 0
fi
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "${KEEP:-0}" = 1 ] && [ -n "$NODE_ID" ]; then
    printf 'CLUSTER=%q\nNODE_ID=%q\nROUTE=%q\nNETWORK_MADE=%q\n' "$CLUSTER" "$NODE_ID" "$ROUTE" "$NETWORK_MADE" > "$DIR/state"
    printf '\nKEEP=1: cluster %s left running (the e2e lock is released).\n  export KUBECONFIG=%s\n  kubectl: %s\n  stop: %s --stop %s\n' \
      "$CLUSTER" "$KC" "$K8S_ASSETS/kubectl" "$0" "$DIR"
    mkdir -p "$CACHE"; echo "$DIR" > "$KEPT"
    exit "$rc"
  fi
  step "cleanup"
  teardown
  echo "e2e-kind: cleaned up after $(elapsed) s; rc $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- prerequisites (each a no-op when already there) ---
step "prerequisites: venv, Kubernetes 1.34 binaries, helm, CRIU bundle, docker.io, debootstrap"
[ -x "$ROOT/.venv/bin/python" ] || "$HACK/setup.sh"
ok=1; for b in kubelet kubeadm kubectl kube-apiserver kube-controller-manager kube-scheduler etcd; do
  [ -x "$K8S_ASSETS/$b" ] || ok=; done
[ -n "$ok" ] || KUBE_TEST_VERSION=1.34 "$HACK/install-k8s-test-assets.sh" "$K8S_ASSETS"
HELM=$("$HACK/install-helm.sh" 2>/dev/null)/helm
[ -x "$CRIU_BUNDLE/bin/criu" ] || "$HACK/build-criu.sh" "$CRIU_BUNDLE"
need=(); command -v dockerd >/dev/null || need+=(docker.io); command -v debootstrap >/dev/null || need+=(debootstrap)
command -v gcc >/dev/null && [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(gcc libc6-dev)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
echo "kubelet $("$K8S_ASSETS/kubelet" --version), helm $("$HELM" version --template '{{.Version}}'), $("$CRIU_BUNDLE/bin/criu" --version | head -1)"

# --- dockerd: the running one if it can run kind's privileged node here, else our own ---
step "dockerd"
if docker info >/dev/null 2>&1; then
  if [ -n "$NEED_CLAMP" ] && ! docker info --format '{{json .Runtimes}}' | grep -q '"clampoom"'; then
    skip_or_die "a dockerd runs without the clampoom runtime of start-real-node.sh (root here lacks CAP_SYS_RESOURCE, a privileged node needs it); stop it first"
  fi
  echo "using the running dockerd"
else
  args=(--exec-opt native.cgroupdriver=cgroupfs --storage-driver "${DOCKER_STORAGE_DRIVER:-overlay2}" --pidfile "$DIR/dockerd.pidfile")
  if [ -n "$NEED_CLAMP" ]; then
    # the runc wrapper of hack/start-real-node.sh, taken from there (one copy of it in the tree)
    W=$CACHE/runc-clamp-oom; mkdir -p "$CACHE"
    sed -n "/^cat > \"\$WRAPPER.new\" <<'EOF'\$/,/^EOF\$/p" "$HACK/start-real-node.sh" | sed '1d;$d' > "$W.new"
    grep -q 'exec runc' "$W.new" || { echo "no runc wrapper found in $HACK/start-real-node.sh" >&2; exit 1; }
    chmod 0755 "$W.new"; mv "$W.new" "$W"
    args+=(--add-runtime "clampoom=$W" --default-runtime clampoom)
  fi
  nohup dockerd "${args[@]}" </dev/null >"$DIR/logs/dockerd.log" 2>&1 9>&- &  # not the lock: it outlives KEEP=1
  echo $! > "$DIR/dockerd.pid"
  for i in $(seq 300); do docker info >/dev/null 2>&1 && break
    [ -e "/proc/$(cat "$DIR/dockerd.pid")" ] && [ "$i" != 300 ] || { tail "$DIR/logs/dockerd.log" >&2; exit 1; }; sleep 0.1; done
  echo "started dockerd ${NEED_CLAMP:+with the clampoom runtime }(pid $(cat "$DIR/dockerd.pid"))"
fi

# --- kind and the node image, no registry ---
step "kind and the node image, cached in $CACHE (hack/kind-node-image.sh)"
NODE_IMAGE=$("$HACK/kind-node-image.sh")
echo "node image $NODE_IMAGE; $("$KIND" version)"

# --- the project's images, no registry (as hack/e2e-real-node.sh builds them) ---
step "images: $BASE, $IMAGE (project Dockerfile), $ENGINE_IMAGE"
have() { docker image inspect "$1" >/dev/null 2>&1; }
if ! have local/debian:bookworm; then
  MIRROR=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
           awk '$2 == "bookworm" { print $1; exit }')
  debootstrap --variant=minbase bookworm "$DIR/rootfs" "$MIRROR" >"$DIR/logs/debootstrap.log" 2>&1 ||
    { tail "$DIR/logs/debootstrap.log" >&2; exit 1; }
  rm -rf "$DIR"/rootfs/var/cache/apt/archives/*.deb "$DIR"/rootfs/var/lib/apt/lists/*
  tar -C "$DIR/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - local/debian:bookworm >/dev/null
  rm -rf "$DIR/rootfs"
fi
if ! have "$BASE"; then
  mkdir -p "$DIR/base"
  cat > "$DIR/base/Dockerfile" <<'EOF'
FROM local/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip procps \
 && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && ln -s /usr/bin/python3 /usr/local/bin/python3 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && ln -s /usr/bin/pip3 /usr/local/bin/pip
CMD ["python3"]
EOF
  docker build -t "$BASE" "$DIR/base" >"$DIR/logs/build-base.log" 2>&1 || { tail -20 "$DIR/logs/build-base.log" >&2; exit 1; }
fi
CTX=$DIR/ctx
mkdir -p "$CTX/hack" "$CTX/prebuilt/wheels"
cp -a "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/operator" "$CTX/"
cp -a "$ROOT/hack/build-criu.sh" "$CTX/hack/"
cp -a "$CRIU_BUNDLE" "$CTX/prebuilt/criu"
# SOURCE_DATE_EPOCH: the same tree gives the same wheel, byte for byte (its files' times are fixed),
# so docker's layer cache serves the next walk's build and only a changed tree builds again.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800} "$ROOT/.venv/bin/pip" wheel -q "$CTX" -w "$CTX/prebuilt/wheels" >"$DIR/logs/pip-wheel.log" 2>&1 ||
  { tail -20 "$DIR/logs/pip-wheel.log" >&2; exit 1; }
rm -rf "$CTX/build" "$CTX"/operator/*.egg-info
docker build -t "$IMAGE" --build-arg PYTHON_IMAGE="$BASE" "$CTX" >"$DIR/logs/build-image.log" 2>&1 ||
  { tail -30 "$DIR/logs/build-image.log" >&2; exit 1; }
if [ "$ENGINE_IMAGE" = local/hibernate-engine:kind ]; then
  printf 'FROM %s\nUSER 0:0\n' "$IMAGE" | docker build -t "$ENGINE_IMAGE" - >"$DIR/logs/build-engine.log" 2>&1 ||
    { tail -20 "$DIR/logs/build-engine.log" >&2; exit 1; }
fi
rm -rf "$CTX"
# The hostile engine of tests/e2e/hostile.py (as hack/e2e-real-node.sh builds it)
mkdir -p "$DIR/hostile"
gcc -O2 -static-pie -nostdlib -fno-stack-protector -o "$DIR/hostile/recorder" "$ROOT/tests/hostile/recorder.c"
gcc -O2 -shared -fPIC -DRECORDER_LIBRARY -o "$DIR/hostile/librecorder.so" "$ROOT/tests/hostile/recorder.c"
cp "$ROOT/tests/e2e/hostile_engine.py" "$DIR/hostile/"
printf 'FROM %s\nCOPY recorder librecorder.so hostile_engine.py /hostile/\n' "$ENGINE_IMAGE" > "$DIR/hostile/Dockerfile"
docker build -t "$HOSTILE_IMAGE" "$DIR/hostile" >"$DIR/logs/build-hostile.log" 2>&1 ||
  { tail -20 "$DIR/logs/build-hostile.log" >&2; exit 1; }

# --- the cluster ---
step "kind create cluster --name $CLUSTER --image $NODE_IMAGE"
# A cluster of this name that no KEEP=1 run kept is left over from a run that was killed before its
# cleanup (this run holds the e2e lock, so no other run is using it): delete it and go on.
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kept=$(cat "$KEPT" 2>/dev/null || true)
  if [ -n "$kept" ] && [ -f "$kept/state" ]; then
    echo "cluster $CLUSTER was kept by a KEEP=1 run: stop it with $0 --stop $kept, or set CLUSTER" >&2; exit 1
  fi
  echo "cluster $CLUSTER is left over from an interrupted run (no KEEP=1 run kept it): deleting it"
  delete_cluster "$(docker inspect -f '{{.Id}}' "$NODE" 2>/dev/null || echo none)"; rm -f "$KEPT"
fi
for s in "${SYSCTLS[@]}"; do echo "$s = $(sysctl -n "$s")"; done > "$DIR/sysctl.orig"
cat > "$DIR/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true   # kindnetd is a registry image: the node image has a bridge CNI config
  kubeProxyMode: none       # so is kube-proxy: a DNAT rule for the API server's Service IP instead
nodes:
- role: control-plane
  image: $NODE_IMAGE
kubeadmConfigPatches:
- |
  kind: InitConfiguration
  skipPhases: [preflight, addon/kube-proxy, addon/coredns]
EOF
docker network inspect kind >/dev/null 2>&1 || NETWORK_MADE=1
NODE_ID=pending
"$KIND" create cluster --name "$CLUSTER" --config "$DIR/kind.yaml" --kubeconfig "$KC" --wait 120s 2>&1 | tee "$DIR/logs/kind-create.log" ||
  { "$KIND" export logs "$DIR/logs/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
    tail -40 "$DIR/logs/kind/$NODE/kubelet.log" 2>/dev/null || true; exit 1; }
NODE_ID=$(docker inspect -f '{{.Id}}' "$NODE")
NODE_IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$NODE")
docker exec "$NODE" sh -c "iptables -t nat -I PREROUTING -d $API_SVC_IP/32 -p tcp --dport 443 -j DNAT --to-destination $NODE_IP:6443 &&
  iptables -t nat -I OUTPUT -d $API_SVC_IP/32 -p tcp --dport 443 -j DNAT --to-destination $NODE_IP:6443"
ROUTE="$POD_SUBNET via $NODE_IP"
ip route replace $ROUTE
K get nodes -o wide

step "kind load docker-image $IMAGE $ENGINE_IMAGE $HOSTILE_IMAGE"
imgs=("$IMAGE"); [ "$ENGINE_IMAGE" = "$IMAGE" ] || imgs+=("$ENGINE_IMAGE"); imgs+=("$HOSTILE_IMAGE")
"$KIND" load docker-image --name "$CLUSTER" "${imgs[@]}"

# --- the chart ---
step "helm install $RELEASE ./helm/hibernate (image $IMAGE)"
"$HELM" --kubeconfig "$KC" install "$RELEASE" "$ROOT/helm/hibernate" -n "$RELEASE_NS" --create-namespace \
  -f "$ROOT/helm/hibernate/ci/cpu-only-values.yaml" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  --set operator.logFormat=plain --set agent.logFormat=plain >"$DIR/logs/helm.log" 2>&1 ||
  { cat "$DIR/logs/helm.log" >&2; exit 1; }
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
if wants prometheus; then "${PROM[@]}" start --dir "$DIR/prometheus" --kubectl "$K8S_ASSETS/kubectl --kubeconfig $KC" --namespace "$RELEASE_NS" \
  --release "$RELEASE" --helm "$HELM" 9>&- || prom_rc=$?; fi

# --- the walk ---
step "the walk (tests/e2e/walk.py)"
rc=0
"$ROOT/.venv/bin/python" "$ROOT/tests/e2e/walk.py" --kubectl "$K8S_ASSETS/kubectl --kubeconfig $KC" \
  --engine-image "$ENGINE_IMAGE" --pull-policy IfNotPresent --release-namespace "$RELEASE_NS" \
  ${LEVELS:+--levels "$LEVELS"} --summary-json "$DIR/walk.json" --expect-restore || rc=$?
step "Prometheus: a query of each level's wake seconds returns the walk's wakes"
if ! wants prometheus; then :
elif [ "$prom_rc" = 0 ]; then "${PROM[@]}" check --dir "$DIR/prometheus" --walk-summary "$DIR/walk.json" || rc=1
else echo "prometheus did not start (above)"; rc=1; fi
step "two replicas, one asleep: no request reaches it (tests/e2e/readiness.py)"
if wants readiness; then "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/readiness.py" --kubectl "$K8S_ASSETS/kubectl --kubeconfig $KC" \
  --engine-image "$ENGINE_IMAGE" --pull-policy IfNotPresent --release-namespace "$RELEASE_NS" --release "$RELEASE" || rc=1; fi
step "a hostile engine: a Checkpoint cycle and a deletion give it nothing (tests/e2e/hostile.py, canaries in the node)"
NODE_PID=$(docker inspect -f '{{.State.Pid}}' "$NODE")
if wants hostile; then "$ROOT/.venv/bin/python" "$ROOT/tests/e2e/hostile.py" --kubectl "$K8S_ASSETS/kubectl --kubeconfig $KC" \
  --engine-image "$HOSTILE_IMAGE" --pull-policy IfNotPresent --release-namespace "$RELEASE_NS" \
  --canary-dir "$CANARY" --node-root "/proc/$NODE_PID/root" || rc=1; fi
step "the agent's log (its DaemonSet pod)"
K -n "$RELEASE_NS" logs ds/$RELEASE-agent --tail 400 2>&1 | grep -v 'GET /healthz\|GET /metrics' | tail -25 || true
exit "$rc"
