#!/usr/bin/env bash
# hack/test.sh: install what is missing, then the checks CI runs: generated files up to date, ruff,
# mypy, and the whole test suite against a real control plane. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
hack/setup.sh
V=.venv/bin
echo "== generated CRD is up to date" && $V/hibernate crds --check -o crds/modeldeployments.hibernate.dev.yaml
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
exit "$rc"
