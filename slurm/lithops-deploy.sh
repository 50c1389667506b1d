#!/bin/bash
# lithops-deploy.sh: Lithops workers on every node of a Slurm job.
#
#   sbatch -N3 lithops-deploy.sh
#   sbatch -N3 lithops-deploy.sh /scratch/$USER/lithops-rt.sif
#   sbatch -N8 --time=4:00:00 lithops-deploy.sh --transfer sbcast
#   LITHOPS_SIF=/scratch/rt.sif sbatch lithops-deploy.sh
#
# Arguments: [IMAGE.sif] [lithops-hpc deploy options...] (see lithops-hpc(1)).
# The image comes from the first argument, else $LITHOPS_SIF, else the
# configuration: <sif_path>/<runtime>.sif, as the Lithops client names it
# (singularity.sif_path and singularity.runtime of ~/.lithops/config or
# lithops-hpc.toml(5)). The configuration: the user's Lithops config
# ($LITHOPS_CONFIG_FILE, else ~/.lithops/config, ...) under
# $LITHOPS_HPC_CONFIG, else ~/.config/lithops-hpc/config.toml, else
# /etc/lithops-hpc/config.toml. sbatch options on the command line
# override the #SBATCH lines below. Watch it with `lithops-hpc status`, end it
# gracefully with `lithops-hpc stop` (or scancel).
#
# ---- Edit here --------------------------------------------------------------
#SBATCH --job-name=lithops-workers
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1        # one deploy rank per node; it runs that node's workers
#SBATCH --exclusive                # workers use every core of their node (or: --cpus-per-task=N
#                                  #   together with singularity.worker_processes = N)
#SBATCH --time=01:00:00            # deploy drains by itself deploy.drain_before_end seconds before
#SBATCH --output=lithops-workers-%j.out
#SBATCH --no-kill                  # a failed node does not end the job: its tasks go back to
#                                  #   the queue and the other nodes serve them
# Site-specific: uncomment what your site requires.
##SBATCH --partition=compute
##SBATCH --account=PROJECT
##SBATCH --qos=normal
##SBATCH --mem=0                   # all of each node's memory
# Only when lithops-hpc was built without libslurm (meson -Dslurm=disabled):
# deploy cannot ask Slurm for the time left, so let Slurm send the early
# SIGTERM instead (up to 60 s earlier than asked). Keep it above deploy.drain_timeout.
##SBATCH --signal=TERM@150
# -----------------------------------------------------------------------------

set -euo pipefail

# Site-specific: make lithops-hpc and the container engine available.
#module load lithops-hpc
#module load apptainer
# A fixed configuration instead of the lookup described above:
#export LITHOPS_HPC_CONFIG=$HOME/lithops-hpc/config.toml

die() { echo "lithops-deploy.sh: $1" >&2; exit "${2:-1}"; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with 'sbatch [-N NODES] lithops-deploy.sh IMAGE.sif'" 2

SIF=${LITHOPS_SIF:-}
if [[ $# -gt 0 && $1 != -* ]]; then
    SIF=$1
    shift
fi
# No image given: deploy runs <sif_path>/<runtime>.sif from the configuration
# (and says where to set singularity.runtime when it is unset).
sif_args=()
if [[ -n $SIF ]]; then
    [[ $SIF == /* ]] || SIF=$PWD/$SIF
    [[ -f $SIF && -r $SIF ]] || die "image $SIF is not a readable file (on $(hostname -s))" 4
    sif_args=(--sif "$SIF")
fi

# $LITHOPS_HPC_BIN: a build tree's binary (tests); else lithops-hpc from PATH.
LHPC=${LITHOPS_HPC_BIN:-$(command -v lithops-hpc || true)}
[[ -n $LHPC && -x $LHPC ]] ||
    die "lithops-hpc not found in PATH: 'module load lithops-hpc' (see above) or set LITHOPS_HPC_BIN" 127

# Open MPI refuses root unless told otherwise (containers, test clusters).
if [[ $(id -u) -eq 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# Give each rank every CPU the job holds on its node: srun does not inherit
# --exclusive/--cpus-per-task from sbatch (Slurm 22.05), and a rank bound to
# one core would squeeze all of its workers onto it. Nodes may differ: take
# the smallest ("2(x3)", "32,64(x2)").
cpus=0
IFS=, read -ra counts <<<"${SLURM_JOB_CPUS_PER_NODE:-}"
for c in "${counts[@]}"; do
    c=${c%%(*}
    [[ $c =~ ^[0-9]+$ ]] && ((cpus == 0 || c < cpus)) && cpus=$c
done
per_node=${SLURM_NTASKS_PER_NODE:-1}
[[ $per_node =~ ^[0-9]+$ && $per_node -gt 0 ]] || per_node=1
cpus_per_rank=$((cpus / per_node))
((cpus_per_rank > 0)) || cpus_per_rank=1

echo "lithops-deploy.sh: job $SLURM_JOB_ID, ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-?}," \
    "$cpus_per_rank CPU(s) per rank; image ${SIF:-<sif_path>/<runtime>.sif of the configuration};" \
    "config ${LITHOPS_HPC_CONFIG:-default lookup};" \
    "$("$LHPC" --version 2>/dev/null || echo "$LHPC")"

# --mpi: the PMI plugin Open MPI needs (`srun --mpi=list` shows a site's;
# Debian's Open MPI works only with pmix). --kill-on-bad-exit=0: a rank that
# fails leaves the other nodes serving.
# exec: the batch step's signals reach srun, which forwards them to the ranks.
exec srun --mpi="${LITHOPS_SRUN_MPI:-pmix}" --kill-on-bad-exit=0 --cpus-per-task="$cpus_per_rank" \
    "$LHPC" deploy "${sif_args[@]}" "$@"
