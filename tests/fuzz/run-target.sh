#!/usr/bin/env bash
# One deterministic libFuzzer run of a harness, the CI's `fuzz/<target>` test:
# it replays every seed of the corpus, then runs a fixed number of new inputs
# mutated from a fixed seed (-seed, -runs; no -max_total_time), so a run does
# the same work on an idle and on a loaded machine and passes or fails the
# same way. The open-ended search is bench/fuzz.sh (README.md here).
# New inputs go to a temporary directory, never into the tree; a crash is
# kept under the build directory and its path and the replay command printed.
# Usage: run-target.sh HARNESS CORPUS_DIR INPUTS
set -euo pipefail
exe=$1 corpus=$2 inputs=$3
here=$(cd "$(dirname "$0")" && pwd)
name=$(basename "$exe")
name=${name#fuzz_}
# libFuzzer counts the seeds it replays in -runs: add them, so INPUTS new
# inputs run whatever the corpus holds.
seeds=$(find "$corpus" -type f | wc -l)
work=$(mktemp -d "${TMPDIR:-/tmp}/lhpc-fuzz-$name.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/new"
# The same inputs on every run needs more than -seed: libFuzzer's comparison
# tables and coverage pick up addresses, so the harness runs without address
# randomisation (setarch -R) and in a fixed environment (env -i: meson sets
# a random MALLOC_PERTURB_, which moves the stack), and with -reload=0
# (re-reading the output directory goes by the clock). Two runs then end
# with the same coverage and corpus.
norand=(env -i PATH="$PATH")
if setarch "$(uname -m)" -R true 2>/dev/null; then
  norand+=(setarch "$(uname -m)" -R)
else
  echo "fuzz/$name: setarch -R refused: addresses are random, the inputs may differ between runs" >&2
fi
# -timeout only catches a hang: libFuzzer's slowest input here took under a
# second even on the 2-core machine at load 27, far from it.
args=(-seed=1 -runs=$((seeds + inputs)) -reload=0 -timeout=120 -rss_limit_mb=2560
      -error_exitcode=1 -timeout_exitcode=1 -print_final_stats=1 -artifact_prefix="$work/")
if [ -f "$here/dict/$name.dict" ]; then
  args+=(-dict="$here/dict/$name.dict")
fi
echo "fuzz/$name: $seeds seeds, then $inputs inputs from -seed=1"
set +e
"${norand[@]}" "$exe" "${args[@]}" "$work/new" "$corpus" 2>&1 | tail -n 60
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
