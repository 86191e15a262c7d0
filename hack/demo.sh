#!/usr/bin/env bash
# hack/demo.sh: install what is missing, then run the local demo (`hibernate demo`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/hack/setup.sh"
exec "$ROOT/.venv/bin/hibernate" demo "$@"
