#!/bin/bash
# The longer fuzzing campaign, the open-ended search CI does not do (CI runs a
# fixed number of inputs: tests/fuzz/README.md): each libFuzzer harness
# for SECONDS (default 300) on one core, one after the other, starting from
# the seed corpus of the tree plus whatever an earlier campaign in the same
# work directory found. Prints a Markdown table: target, executions,
# executions/s, coverage (libFuzzer's cov: edges and ft: features), corpus
# size, largest input found (seeds not counted), findings (crash/leak/timeout/oom files).
#   bench/fuzz.sh [FUZZ_BUILD_DIR]     (default ./build-fuzz; made by tests/fuzz/build.sh)
#   SECONDS_PER_TARGET=300 TARGETS="sif message ..." WORK=build-fuzz/campaign
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$SRC/build-fuzz}
PER=${SECONDS_PER_TARGET:-300}
TARGETS=${TARGETS:-"sif message payload config amqp_url status record"}
"$SRC/tests/fuzz/build.sh" "$BUILD" >&2
BUILD=$(cd "$BUILD" && pwd)
WORK=${WORK:-$BUILD/campaign}
mkdir -p "$WORK"

echo "| target | seconds | executions | exec/s | cov (edges) | ft | corpus | largest new input | findings |"
echo "|---|---|---|---|---|---|---|---|---|"
for t in $TARGETS; do
    exe=$BUILD/tests/fuzz/fuzz_$t
    corpus=$WORK/$t/corpus
    art=$WORK/$t/findings
    mkdir -p "$corpus" "$art"
    args=(-max_total_time="$PER" -timeout=30 -rss_limit_mb=2560 -print_final_stats=1
          -artifact_prefix="$art/" -error_exitcode=1 -timeout_exitcode=1)
    [[ -f $SRC/tests/fuzz/dict/$t.dict ]] && args+=(-dict="$SRC/tests/fuzz/dict/$t.dict")
    # -fork=1 keeps going after a finding (each one is kept in $art), so one
    # crash does not end the target's campaign at its first minute.
    "$exe" "${args[@]}" -print_funcs=0 -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        "$corpus" "$SRC/tests/fuzz/corpus/$t" >"$WORK/$t/log" 2>&1 || true
    log=$WORK/$t/log
    # In fork mode the parent prints "#N: cov: C ft: F corp: K exec/s E ..."
    # (sometimes glued to the end of a child's line: not anchored).
    last=$(grep -oE '#[0-9]+: cov: .*' "$log" | tail -n 1 || true)
    execs=$(sed -nE 's/^#([0-9]+): .*/\1/p' <<<"$last")
    cov=$(sed -nE 's/.* cov: ([0-9]+) .*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+) .*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+) .*/\1/p' <<<"$last")
    largest=$(find "$corpus" -type f -printf '%s\n' | sort -n | tail -n 1)
    findings=$(find "$art" -type f | wc -l)
    rate=$(awk -v e="${execs:-0}" -v s="$PER" 'BEGIN { printf "%d", e / s }')
    echo "| $t | $PER | ${execs:-?} | $rate | ${cov:-?} | ${ft:-?} | ${corp:-?} | ${largest:-0} B | $findings |"
done
echo
echo "Findings, if any, are under $WORK/<target>/findings; logs in $WORK/<target>/log."
echo "A fixed finding becomes a seed (corpus/<target>/regress-*) that every CI run replays: tests/fuzz/README.md, \"From a finding to a seed\"."
