#!/usr/bin/env bash
# The test command of the README and of CI: set-up (idempotent), the offline model store for the `slow`
# real-weight tests, then pytest. Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "$(date '+%F %T') [test.sh:${BASH_LINENO[0]}] $*"; }

start=$SECONDS
bash scripts/setup.sh
if [ "${DQWHISPER_SKIP_MODELS:-0}" != 1 ]; then
  bash scripts/prepare_models.sh
fi
log "running pytest"
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
[ $rc = 5 ] && { echo "test.sh: pytest collected no tests" >&2; rc=1; }
log "tests finished in $((SECONDS - start)) s (exit $rc)"
exit $rc
