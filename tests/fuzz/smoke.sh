#!/usr/bin/env bash
# The `fuzz/smoke` test of a g++ build: builds the harnesses with clang beside
# it ($LHPC_FUZZ_BUILD_DIR) and runs each one's bounded smoke run; SKIP
# (exit 77) when clang or libFuzzer is missing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${LHPC_FUZZ_BUILD_DIR:?set by meson}
"$here/build.sh" "$dir"
rc=$?
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
exec meson test -C "$dir" --no-rebuild --suite fuzz --print-errorlogs
