#!/usr/bin/env bash
# Benchmark (not a test): `lithops-hpc stage` of one image to N ranks-as-nodes
# on this machine against `cp` of the same image to N files. Prints a
# Markdown table (median of REPS runs) and the model for N real nodes.
#
#   bench/stage.sh [BUILD_DIR]          (default: build)
#   SIZE=1G RANKS="2 4 8" REPS=3 CHUNK_MIB=8 WORK=/tmp/lhpc-bench-stage bench/stage.sh build
#
# What is measured, and what is not:
# - Every run writes N fresh files (the destination tree is deleted and
#   `sync` is run before each run, outside the timing), so no run pays for an
#   earlier run's writeback and none overwrites pages already in cache.
# - The source is read once before the runs and stays in page cache for cp
#   and stage alike: the comparison is of writing N copies, not of reading
#   the source from disk. DROP_CACHES=1 (root, writable /proc/sys/vm/drop_caches)
#   drops the page cache before every run instead, so each run reads the
#   source cold; it affects every process on the machine.
# - Neither cp nor stage fsyncs: a run ends when every copy is in page cache,
#   as `cp` leaves it. Both are limited here by first writes into fresh page
#   cache pages (see docs/test-rig.md), not by the disk.
# - stage runs use their own job id each (no skip), under mpirun with
#   --oversubscribe (ranks > cores) and --bind-to none (mpirun pins each
#   rank to one core when ranks <= cores; cp processes float freely, and on a
#   shared machine a pinned rank waits whenever another job holds its core),
#   each rank its own node (%n).
# - "stage" is mpirun's wall time (MPI start-up included); "in-stage" is the
#   time stage reports (from its first collective to the last verification).
# - cp runs: "cp seq" copies one file after another (a script doing it by
#   hand); "cp par" starts N cp processes at once. The ratio is stage wall
#   time over the faster of the two.
set -euo pipefail

BUILD=${1:-build}
SIZE=${SIZE:-1G}
RANKS=${RANKS:-2 4 8}
REPS=${REPS:-3}
CHUNK_MIB=${CHUNK_MIB:-8}
WORK=${WORK:-${TMPDIR:-/tmp}/lhpc-bench-stage}
BIN=$(cd "$BUILD" && pwd)/lithops-hpc
MAKE_SIF=$(cd "$BUILD" && pwd)/tests/tools/make-sif

[[ -x $BIN ]] || { echo "stage.sh: $BIN not built" >&2; exit 2; }
[[ -x $MAKE_SIF ]] || { echo "stage.sh: $MAKE_SIF not built (meson compile -C $BUILD)" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "stage.sh: mpirun not found" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/rt.sif
"$MAKE_SIF" "$SRC" "$SIZE"
BYTES=$(stat -c %s "$SRC")
cat "$SRC" >/dev/null

. "$(dirname "$0")/lib.sh"
fresh() {  # outside the timing: no leftovers, no pending writeback, source state as promised
    rm -rf "$WORK/dst" "$WORK/state"
    sync
    if [[ ${DROP_CACHES:-0} == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        cat "$SRC" >/dev/null
    fi
    mkdir -p "$WORK/dst"
}

run_cp_seq() {  # N
    local t0 k; t0=$(now)
    for ((k = 0; k < $1; k++)); do mkdir -p "$WORK/dst/node$k"; cp "$SRC" "$WORK/dst/node$k/rt.sif"; done
    seconds_between "$t0" "$(now)"
}
run_cp_par() {  # N
    local t0 k; t0=$(now)
    for ((k = 0; k < $1; k++)); do (mkdir -p "$WORK/dst/node$k" && cp "$SRC" "$WORK/dst/node$k/rt.sif") & done
    wait
    seconds_between "$t0" "$(now)"
}
run_stage() {  # N rep -> wall time; stage's own time goes to $WORK/inner
    local t0 t1 out
    t0=$(now)
    out=$(LITHOPS_HPC_JOB_ID="bench-$1-$2-$$" LITHOPS_HPC_STATE_DIR="$WORK/state" \
        mpirun --oversubscribe --bind-to none -np "$1" sh -c 'LITHOPS_HPC_NODE_ID=node$OMPI_COMM_WORLD_RANK exec "$0" "$@"' \
        "$BIN" --log-level warn stage --json --sif "$SRC" --sif-path "$WORK/dst/%n" --chunk-mib "$CHUNK_MIB")
    t1=$(now)
    sed -n 's/.*"seconds": *\([0-9.e+-]*\).*/\1/p' <<<"$out" >"$WORK/inner"
    [[ $(grep -c '"skipped": false' <<<"$out") == 1 ]] || { echo "stage.sh: unexpected stage output: $out" >&2; exit 1; }
    seconds_between "$t0" "$t1"
}

echo "# stage benchmark: $(numfmt --to=iec "$BYTES") image, chunk ${CHUNK_MIB} MiB, median of $REPS, $(nproc) cores," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
rows=()
for n in $RANKS; do
    s_wall=() s_in=() c_seq=() c_par=()
    for ((rep = 1; rep <= REPS; rep++)); do
        # Alternate the order so drifting load on a shared machine hits both alike.
        if ((rep % 2)); then
            fresh; s_wall+=("$(run_stage "$n" "$rep")"); s_in+=("$(cat "$WORK/inner")")
            fresh; c_seq+=("$(run_cp_seq "$n")")
            fresh; c_par+=("$(run_cp_par "$n")")
        else
            fresh; c_par+=("$(run_cp_par "$n")")
            fresh; c_seq+=("$(run_cp_seq "$n")")
            fresh; s_wall+=("$(run_stage "$n" "$rep")"); s_in+=("$(cat "$WORK/inner")")
        fi
        echo "  N=$n rep $rep: stage ${s_wall[-1]} s (in-stage ${s_in[-1]} s), cp seq ${c_seq[-1]} s, cp par ${c_par[-1]} s" >&2
    done
    sw=$(median "${s_wall[@]}") si=$(median "${s_in[@]}") cs=$(median "${c_seq[@]}") cpp=$(median "${c_par[@]}")
    rows+=("$(awk -v n="$n" -v b="$BYTES" -v sw="$sw" -v si="$si" -v cs="$cs" -v cp="$cpp" 'BEGIN {
        best = cs < cp ? cs : cp
        printf "| %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f |", n, sw, si, cs, cp, sw / best,
               n * b / sw / 1e6, n * b / best / 1e6 }')")
done

cat <<EOF

| N (ranks = nodes) | stage (s) | in-stage (s) | cp seq (s) | cp par (s) | stage / best cp | stage MB/s (all copies) | best cp MB/s |
|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

Image $(numfmt --to=iec "$BYTES") ($BYTES bytes), chunk $CHUNK_MIB MiB, median of $REPS runs, $(nproc) cores.
Source hot in page cache for every run$([[ ${DROP_CACHES:-0} == 1 ]] && echo " (no: DROP_CACHES=1, cold)"); destination
tree deleted and synced before every run; nothing fsynced inside the timing.

Model for N real nodes (S image size, c chunk, B the slower of a node's
link and its local write rate, L per-message latency):
  stage --transfer mpi, a pipelined chain (each link carries the image once,
  chunk i+1 travels while chunk i is written):
      T_mpi(N)    ~ S/B + (N-1)*(c/B + L)
  sbcast, a store-and-forward fan-out tree (fan-out F <= 8, sbcast --fanout),
  every node sending each block to its F children one after the other, and
  each block acknowledged through the tree before the next one leaves
  (stop-and-wait, so the levels never overlap):
      T_sbcast(N) ~ ceil(log_F N) * min(N, F) * S/B  (+ a tree round trip per block)
  cp/scp to each node from one host: T_cp(N) ~ N*S/B.
  Example, S = 1 GiB, B = 1.25 GB/s (10 GbE or a node's page cache), c = 8 MiB:
      N = 8:   mpi ~ 0.9 s + 7*6.7 ms = 0.91 s    sbcast ~ 1*8*0.86 = 6.9 s    cp ~ 6.9 s
      N = 64:  mpi ~ 0.9 s + 63*6.7 ms = 1.3 s    sbcast ~ 2*8*0.86 = 13.7 s   cp ~ 55 s
      N = 512: mpi ~ 0.9 s + 511*6.7 ms = 4.3 s   sbcast ~ 3*8*0.86 = 20.6 s   cp ~ 440 s
EOF
