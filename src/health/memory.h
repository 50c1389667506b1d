// Resident memory of a rank for its health report: the rank process itself
// and the sum over its process tree (the handler processes are its children).
#pragma once

#include <sys/types.h>

#include <cstdint>

namespace lhpc::health {

struct Memory {
  std::uint64_t self_kb = 0;  // VmRSS of `pid`
  std::uint64_t tree_kb = 0;  // self_kb + VmRSS of every descendant
};

// Reads /proc: VmRSS from /proc/PID/status; descendants through
// /proc/PID/task/*/children (falling back to a scan of /proc/*/stat where the
// kernel lacks that file). The tree sum counts shared pages once per process,
// so it is an upper bound. Processes that detached from the tree (a
// singularity instance's daemon is reparented to init) are not counted.
// A process that vanished while being read counts as 0. Never throws.
Memory read_memory(pid_t pid = 0);  // 0: this process

}  // namespace lhpc::health
