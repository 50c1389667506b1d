#!/usr/bin/env bash
# One bounded libFuzzer run of a harness over its seed corpus: the CI smoke
# (`meson test --suite fuzz`). New inputs go to a temporary directory, never
# into the tree; a crash is kept under the build directory and its path and
# the command that replays it are printed.
# Usage: run-target.sh HARNESS CORPUS_DIR RUNS [MAX_SECONDS]
set -euo pipefail
exe=$1 corpus=$2 runs=$3 max_time=${4:-20}
here=$(cd "$(dirname "$0")" && pwd)
name=$(basename "$exe")
name=${name#fuzz_}
work=$(mktemp -d "${TMPDIR:-/tmp}/lhpc-fuzz-$name.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/new"
args=(-runs="$runs" -max_total_time="$max_time" -seed=1 -timeout=30 -rss_limit_mb=2560
      -error_exitcode=1 -timeout_exitcode=1 -print_final_stats=1 -artifact_prefix="$work/")
if [ -f "$here/dict/$name.dict" ]; then
  args+=(-dict="$here/dict/$name.dict")
fi
set +e
"$exe" "${args[@]}" "$work/new" "$corpus" 2>&1 | tail -n 60
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  keep="$(dirname "$exe")/crashes-$name"
  mkdir -p "$keep"
  for f in "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-* "$work"/slow-unit-*; do
    [ -e "$f" ] || continue
    cp "$f" "$keep/"
    echo "fuzz/$name: finding kept as $keep/$(basename "$f"); replay: $exe $keep/$(basename "$f")"
  done
fi
exit "$rc"
