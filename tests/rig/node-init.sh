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
# as on a real cluster. Directories under /tmp that jobs need (a checkout or
# build tree living there: LHPC_RIG_KEEP, colon-separated) are opened before
# the tmpfs hides them and bound back at the same path, like a shared file system.
keep_fds=()
IFS=: read -r -a keep <<<"${LHPC_RIG_KEEP:-}"
for dir in "${keep[@]}"; do
  [ -n "$dir" ] || continue
  exec {fd}<"$dir"
  keep_fds+=("$fd:$dir")
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
for entry in "${keep_fds[@]}"; do
  fd=${entry%%:*}
  dir=${entry#*:}
  mkdir -p "$dir"
  mount -c --bind "/proc/self/fd/$fd" "$dir"   # -c: the fd, not the new empty dir
  exec {fd}<&-
done
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$LHPC_RIG_HOSTS" /etc/hosts   # n1..nN and the controller resolve here
exec slurmd -D -N "$node" -f "$SLURM_CONF"
