#!/usr/bin/env bash
# hack/test.sh: install what is missing, then the checks CI runs: generated files up to date, ruff,
# mypy, and the whole test suite against a real control plane. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
hack/setup.sh
V=.venv/bin
echo "== generated CRD is up to date" && $V/hibernate crds --check -o crds/modeldeployments.hibernate.dev.yaml
$V/hibernate crds --check --resource gpugroups -o crds/gpugroups.hibernate.dev.yaml
echo "== ruff" && $V/ruff check operator tests bench && $V/ruff format --check operator tests bench
echo "== mypy" && $V/mypy
echo "== pytest"
set +e
$V/pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure here, not a pass" >&2
  exit 1
fi
# End to end on a real kubelet + dockerd with the chart (docs/e2e.md): in CI only, about 1.5 min warm,
# 3 cold; --if-possible skips with the reason where docker.io cannot be installed or root is missing.
if [ "${CI:-}" = true ]; then
  echo "== e2e on a real node (hack/e2e-real-node.sh)"
  hack/e2e-real-node.sh --if-possible || rc=1
  # kind with Kubernetes 1.34 (docs/e2e.md, "On kind"): about 2.5 min warm; once, 6 more to build kind
  # and its node image (cached in ~/.cache/hibernate-kind)
  echo "== e2e on kind, Kubernetes 1.34, node image built without a registry (hack/e2e-kind.sh)"
  hack/e2e-kind.sh --if-possible || rc=1
else
  echo "== e2e on a real node: skipped (CI is not true; run hack/e2e-real-node.sh, docs/e2e.md)"
fi
exit "$rc"
