#!/usr/bin/env bash
# Runs every test: installs dependencies (Debian 12, root), configures, builds,
# runs `meson test` (unit tests, then the integration suites that start their
# own RabbitMQ, Open MPI jobs and Slurm cluster), and ends with one line
# "N passed, N failed, N skipped" computed from meson's testlog.json.
# Usage: tests/run.sh [extra meson test args]   (LHPC_SKIP_INSTALL=1 skips apt)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${LHPC_BUILD_DIR:-$root/build}
cd "$root"
if [ "${LHPC_SKIP_INSTALL:-0}" != 1 ]; then
  deploy/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }
fi
if [ ! -f "$build/build.ninja" ]; then
  meson setup -Dtest_hooks=true "$build" || { echo "0 passed, 1 failed"; exit 1; }
fi
meson configure -Dtest_hooks=true "$build" >/dev/null && meson compile -C "$build" || { echo "0 passed, 1 failed"; exit 1; }
meson test -C "$build" --print-errorlogs "$@"
rc=$?
/usr/bin/python3 - "$build/meson-logs/testlog.json" <<'PY'
import json, sys
passed = failed = skipped = 0
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line).get("result")
        if r in ("OK", "EXPECTEDFAIL"):
            passed += 1
        elif r == "SKIP":
            skipped += 1
        else:
            failed += 1
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
exit $rc
