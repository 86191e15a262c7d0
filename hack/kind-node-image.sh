#!/usr/bin/env bash
# hack/kind-node-image.sh: kind and a kind node image for Kubernetes 1.34, without any container
# registry. Prints the node image's name on stdout (progress on stderr). Needs a running dockerd
# (hack/e2e-kind.sh starts one) and root.
#
#   kind      `go install sigs.k8s.io/kind@$KIND_VERSION` through the Go module proxy; crictl the same
#             way (sigs.k8s.io/cri-tools). Both in $CACHE/bin.
#   rootfs    debootstrap bookworm from Debian's archive with what kind's base image installs
#             (systemd, iptables, nftables, conntrack, iproute2, ...) plus Debian's containerd 1.6,
#             runc 1.1 and containernetworking-plugins 1.1 (kind builds containerd 2, runc and the CNI
#             plugins from source instead); cached as $CACHE/rootfs-*.tar.
#   base      kind's own base image files (entrypoint, systemd units, kubelet drop-ins, sysctls), read
#             from the kind module that `go install` downloaded, with two changes: containerd runs
#             with restrict_oom_score_adj = true (root here has no CAP_SYS_RESOURCE, so a negative
#             oom_score_adj fails runc) and the pause image kubeadm asks for; and a bridge CNI config
#             (kind's own CNI, kindnetd, is a registry image): kind runs with disableDefaultCNI.
#   Kubernetes  kubelet, kubeadm, kubectl from $K8S_ASSETS (hack/install-k8s-test-assets.sh, 1.34,
#             built from Go modules) in /usr/bin, and /kind/version.
#   images    the control plane's images that kubeadm expects (`kubeadm config images list`):
#             kube-apiserver, kube-controller-manager, kube-scheduler and etcd as FROM scratch + the
#             static binary, pause from a 5-line C program; imported into the node's containerd
#             (namespace k8s.io, pinned) at build time, like `kind build node-image` does. No
#             kube-proxy and no CoreDNS image: the cluster runs without them (hack/e2e-kind.sh).
#
# The node image (local/kind-node:<k8s version>-<key>) is saved to $CACHE/node-*.tar: a warm run with
# the image still in docker costs nothing, one with only the tarball a `docker load`.
#   KIND_VERSION, CRICTL_VERSION, K8S_ASSETS, HIBERNATE_KIND_CACHE override the defaults below.
#
#   hack/kind-node-image.sh --prefetch   only what needs no dockerd (kind, crictl, the root filesystem's
#                                        tarball), into the same cache; prints nothing (hack/prebuild-e2e.sh)
set -euo pipefail
PREFETCH=; [ "${1:-}" = --prefetch ] && PREFETCH=1
KIND_VERSION=${KIND_VERSION:-v0.33.0}
CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}
CACHE=${HIBERNATE_KIND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hibernate-kind}
K8S_ASSETS=${K8S_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/k8s-test-assets/1.34}
export DOCKER_BUILDKIT=0   # the legacy builder: local base images, no buildx
T0=${EPOCHREALTIME/./}
log() { local d=$(( ${EPOCHREALTIME/./} - T0 )); printf '[kind-node %3d.%01ds] %s\n' $((d / 1000000)) $((d % 1000000 / 100000)) "$*" >&2; }
die() { echo "kind-node-image: $*" >&2; exit 1; }
mkdir -p "$CACHE/bin"

# --- kind and crictl from the Go module proxy ---
if ! "$CACHE/bin/kind" version 2>/dev/null | grep -q "kind $KIND_VERSION "; then
  log "go install sigs.k8s.io/kind@$KIND_VERSION"
  GOBIN=$CACHE/bin CGO_ENABLED=0 go install -trimpath "sigs.k8s.io/kind@$KIND_VERSION" >&2
fi
if ! "$CACHE/bin/crictl" --version 2>/dev/null | grep -q "${CRICTL_VERSION#v}"; then
  log "go install sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  GOBIN=$CACHE/bin CGO_ENABLED=0 go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2
fi
KIND_SRC=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION
[ -d "$KIND_SRC/images/base/files" ] || GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kind@$KIND_VERSION" >&2
[ -d "$KIND_SRC/images/base/files" ] || die "no $KIND_SRC/images/base/files after go mod download"

# --- the root filesystem: debootstrap (kind's base packages + containerd, runc, CNI plugins) ---
PKGS=systemd,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash
PKGS=$PKGS,ca-certificates,curl,jq,procps,e2fsprogs,containerd,runc,containernetworking-plugins
ROOTFS_TAR=$CACHE/rootfs-bookworm-$(echo "$PKGS" | sha256sum | cut -c1-12).tar
rootfs_tar() {  # debootstrap into a directory of its own, the tarball renamed into place: a second
  # builder at the same time (a prefetch still running) wastes work but breaks nothing
  [ -f "$ROOTFS_TAR" ] && return
  local dir; dir=$(mktemp -d "${TMPDIR:-/var/tmp}/hibernate-kind-rootfs.XXXXXX")
  command -v debootstrap >/dev/null || { log "apt-get install debootstrap"; apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null; }
  MIRROR=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
           awk '$2 == "bookworm" { print $1; exit }')
  [ -n "$MIRROR" ] || die "no apt source for bookworm in the system's apt config"
  log "debootstrap bookworm minbase + $PKGS ($MIRROR)"
  debootstrap --variant=minbase --include="$PKGS" bookworm "$dir/rootfs" "$MIRROR" >"$dir/debootstrap.log" 2>&1 ||
    { tail -20 "$dir/debootstrap.log" >&2; rm -rf "$dir"; die "debootstrap failed"; }
  rm -rf "$dir"/rootfs/var/cache/apt/archives/*.deb "$dir"/rootfs/var/lib/apt/lists/*
  tar -C "$dir/rootfs" -cf "$dir/rootfs.tar" . && mv "$dir/rootfs.tar" "$ROOTFS_TAR"
  rm -rf "$dir"
}
if [ -n "$PREFETCH" ]; then rootfs_tar; log "prefetched: kind, crictl, $ROOTFS_TAR"; exit 0; fi

# --- Kubernetes binaries ---
BINS=(kubelet kubeadm kubectl kube-apiserver kube-controller-manager kube-scheduler etcd)
for b in "${BINS[@]}"; do [ -x "$K8S_ASSETS/$b" ] || die "$K8S_ASSETS/$b missing (hack/install-k8s-test-assets.sh, Kubernetes 1.34)"; done
K8S_VERSION=$("$K8S_ASSETS/kubelet" --version | awk '{print $2}')
case $K8S_VERSION in v1.*) ;; *) die "cannot read the kubelet's version ($K8S_VERSION)" ;; esac
for b in kube-apiserver kube-controller-manager kube-scheduler etcd; do
  file -b "$K8S_ASSETS/$b" 2>/dev/null | grep -q 'dynamically linked' && die "$K8S_ASSETS/$b is dynamically linked; the images are FROM scratch"
done

# The cache key: this script, kind's version, the binaries (size + mtime).
KEY=$( { cat "$0"; echo "$KIND_VERSION $CRICTL_VERSION"
         for b in "${BINS[@]}"; do stat -Lc '%n %s %Y' "$K8S_ASSETS/$b"; done; } | sha256sum | cut -c1-12)
NODE_IMAGE=local/kind-node:$K8S_VERSION-$KEY
NODE_TAR=$CACHE/node-$K8S_VERSION-$KEY.tar
have() { docker image inspect "$1" >/dev/null 2>&1; }
if have "$NODE_IMAGE"; then log "$NODE_IMAGE is in docker already"; echo "$NODE_IMAGE"; exit 0; fi
if [ -f "$NODE_TAR" ]; then
  log "docker load < $NODE_TAR"
  docker load -q < "$NODE_TAR" >&2
  have "$NODE_IMAGE" && { echo "$NODE_IMAGE"; exit 0; }
  log "$NODE_TAR did not hold $NODE_IMAGE; building"
fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hibernate-kind-node.XXXXXX")
BUILDER=
cleanup() {
  [ -z "$BUILDER" ] || docker rm -f -v "$BUILDER" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

rootfs_tar
ROOTFS_IMAGE=local/kind-rootfs:bookworm-$(basename "$ROOTFS_TAR" .tar | sed 's/.*-//')
if ! have "$ROOTFS_IMAGE"; then
  log "docker import $ROOTFS_TAR -> $ROOTFS_IMAGE"
  docker import - "$ROOTFS_IMAGE" < "$ROOTFS_TAR" >/dev/null
fi

# --- the control plane's images, no registry ---
mapfile -t WANT < <("$K8S_ASSETS/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null)
[ "${#WANT[@]}" -gt 0 ] || die "kubeadm config images list gave nothing"
PAUSE=; IMAGES=()
for ref in "${WANT[@]}"; do
  name=${ref##*/}; name=${name%%:*}
  case $name in
    kube-apiserver|kube-controller-manager|kube-scheduler|etcd)
      mkdir -p "$WORK/img-$name"; cp "$K8S_ASSETS/$name" "$WORK/img-$name/$name"
      printf 'FROM scratch\nENV PATH=/usr/local/bin:/usr/bin:/bin\nCOPY %s /usr/local/bin/%s\nENTRYPOINT ["/usr/local/bin/%s"]\n' \
        "$name" "$name" "$name" > "$WORK/img-$name/Dockerfile"
      docker build -q -t "$ref" "$WORK/img-$name" >/dev/null; IMAGES+=("$ref") ;;
    pause)
      PAUSE=$ref; mkdir -p "$WORK/img-pause"
      printf '%s\n' '#include <signal.h>' '#include <unistd.h>' \
        'static void die(int s) { (void)s; _exit(0); }' \
        'int main(void) { signal(SIGINT, die); signal(SIGTERM, die); signal(SIGCHLD, SIG_IGN); for (;;) pause(); }' \
        > "$WORK/img-pause/pause.c"
      gcc -Os -static -s -o "$WORK/img-pause/pause" "$WORK/img-pause/pause.c"
      printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' > "$WORK/img-pause/Dockerfile"
      docker build -q -t "$ref" "$WORK/img-pause" >/dev/null; IMAGES+=("$ref") ;;
    coredns|kube-proxy) log "not built: $ref (the cluster runs without $name)" ;;
    *) die "kubeadm wants an image this script does not know: $ref" ;;
  esac
done
[ -n "$PAUSE" ] || die "kubeadm lists no pause image"
log "built ${IMAGES[*]}"
docker save "${IMAGES[@]}" -o "$WORK/images.tar"

# --- the node image: kind's base files + Kubernetes + the images in containerd ---
CTX=$WORK/ctx
mkdir -p "$CTX/bin"
cp -a "$KIND_SRC/images/base/files" "$CTX/files"; chmod -R u+w "$CTX/files"
rm -f "$CTX/files/etc/systemd/system/containerd-fuse-overlayfs.service"
sed -i 's|^OOMScoreAdjust=.*|# OOMScoreAdjust: not here (no CAP_SYS_RESOURCE)|' "$CTX/files/etc/systemd/system/containerd.service"
cat > "$CTX/files/etc/containerd/config.toml" <<EOF
# kind's base config (images/base/files/etc/containerd/config.toml) for Debian's containerd 1.6,
# without the fuse-overlayfs proxy plugin; restrict_oom_score_adj because root here lacks
# CAP_SYS_RESOURCE (a negative oom_score_adj fails runc); the pause image kubeadm asks for.
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  tolerate_missing_hugepages_controller = true
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = true
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  base_runtime_spec = "/etc/containerd/cri-base.json"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "/etc/cni/net.d"
EOF
mkdir -p "$CTX/files/etc/cni/net.d" "$CTX/files/kind/manifests"
# One node, kind's default pod subnet (10.244.0.0/16): the controller-manager gives it 10.244.0.0/24.
cat > "$CTX/files/etc/cni/net.d/10-bridge.conflist" <<'EOF'
{
  "cniVersion": "0.4.0",
  "name": "hibernate-kind",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
# kind applies this instead of its local-path-provisioner (a registry image): a StorageClass only.
cat > "$CTX/files/kind/manifests/default-storage.yaml" <<'EOF'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
EOF
echo "$K8S_VERSION" > "$CTX/files/kind/version"
for b in kubelet kubeadm kubectl; do cp "$K8S_ASSETS/$b" "$CTX/bin/"; done
cp "$CACHE/bin/crictl" "$CTX/bin/"
cat > "$CTX/Dockerfile" <<EOF
FROM $ROOTFS_IMAGE
COPY files/ /
COPY bin/kubelet bin/kubeadm bin/kubectl /usr/bin/
COPY bin/crictl /usr/local/bin/
# kind's base image steps (images/base/Dockerfile), for Debian's packages
RUN chmod 0755 /usr/local/bin/* /kind /kind/bin /kind/bin/* \\
 && chmod -R go-w /etc/containerd /etc/systemd /etc/default /etc/sysctl.d /etc/cni /kind \\
 && ln -sf /usr/bin/containerd /usr/local/bin/containerd && ln -sf /usr/bin/ctr /usr/local/bin/ctr \\
 && ln -sf /usr/bin/containerd-shim-runc-v2 /usr/local/bin/containerd-shim-runc-v2 \\
 && ln -sf /usr/sbin/runc /usr/local/sbin/runc \\
 && mkdir -p /opt/cni && ln -sfn /usr/lib/cni /opt/cni/bin \\
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
    /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
    /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
 && ln -sf /usr/lib/systemd/systemd /sbin/init \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
 && systemctl mask systemd-binfmt.service \\
 && mkdir -p /etc/kubernetes/manifests \\
 && ctr oci spec | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \\
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
EOF
log "docker build the node's base ($K8S_VERSION, kind $KIND_VERSION files)"
docker build -t "$NODE_IMAGE-base" "$CTX" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; die "docker build failed"; }

log "importing ${#IMAGES[@]} images into the node's containerd (k8s.io, pinned)"
BUILDER=hibernate-kind-build-$KEY
docker rm -f -v "$BUILDER" >/dev/null 2>&1 || true
docker run -d --name "$BUILDER" --privileged --entrypoint sleep "$NODE_IMAGE-base" infinity >/dev/null
docker exec -i "$BUILDER" bash -c '
  set -euo pipefail
  containerd >/tmp/containerd-build.log 2>&1 & pid=$!
  for _ in $(seq 300); do [ -S /run/containerd/containerd.sock ] && ctr info >/dev/null 2>&1 && break; sleep 0.1; done
  ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests - >/dev/null
  ctr --namespace=k8s.io images list -q | grep -v "^sha256:"
  kill "$pid"; wait "$pid" || true
  rm -rf /tmp/containerd-build.log /run/containerd' < "$WORK/images.tar" >&2
docker commit -c 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' -c 'CMD []' "$BUILDER" "$NODE_IMAGE" >/dev/null
docker rm -f -v "$BUILDER" >/dev/null; BUILDER=
docker rmi "$NODE_IMAGE-base" >/dev/null 2>&1 || true
log "docker save $NODE_IMAGE -> $NODE_TAR"
rm -f "$CACHE"/node-*.tar
docker save "$NODE_IMAGE" -o "$NODE_TAR.new" && mv "$NODE_TAR.new" "$NODE_TAR"
log "done: $NODE_IMAGE ($(du -m "$NODE_TAR" | cut -f1) MB)"
echo "$NODE_IMAGE"
