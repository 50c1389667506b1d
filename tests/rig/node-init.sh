#!/bin/bash
# One virtual Slurm node: run by slurm-cluster.sh as
#   setsid unshare --uts --mount -- node-init.sh nX
# inside fresh UTS and mount namespaces, then becomes that node's slurmd.
# Needs SLURM_CONF and LHPC_RIG_HOSTS (hosts file naming n1..nN) in the environment.
set -euo pipefail
node=${1:?usage: node-init.sh NODENAME}
: "${SLURM_CONF:?}" "${LHPC_RIG_HOSTS:?}"

hostname "$node"                  # what `srun hostname` and MPI see
mount --make-rprivate /           # nothing below leaks back to the host
# Private /tmp and /dev/shm: sbcast targets and MPI shared memory are per node,
# as on a real cluster. The cluster dir must therefore live outside /tmp.
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$LHPC_RIG_HOSTS" /etc/hosts   # n1..nN and the controller resolve here
exec slurmd -D -N "$node" -f "$SLURM_CONF"
