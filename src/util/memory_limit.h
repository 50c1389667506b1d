// How much memory this job really has on this node, for capping task slots
// by a runtime's memory: the lowest of the cgroup limit the processes run
// under, Slurm's allocation and the node's RAM. The parsers are pure (unit
// tested on text); job_memory_mb() reads /proc, /sys/fs/cgroup and the
// environment. Not the memory in use: that is health/memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lhpc {

// A cgroup v2 memory.max or v1 memory.limit_in_bytes: bytes -> MiB;
// nullopt for "max", an unset v1 limit (>= 2^60) or text that is not a number.
std::optional<std::uint64_t> parse_cgroup_limit_mb(std::string_view text);
// /proc/self/cgroup -> the path of the memory cgroup below its mount
// ("0::/x" for v2, "N:memory:/x" or "N:...,memory,...:/x" for v1) and whether it is v1.
struct CgroupPath {
  std::string path;
  bool v1 = false;
};
std::optional<CgroupPath> parse_proc_cgroup(std::string_view text);
// Slurm's allocation in MiB: SLURM_MEM_PER_NODE, else SLURM_MEM_PER_CPU x
// SLURM_CPUS_ON_NODE (each may be null).
std::optional<std::uint64_t> slurm_memory_mb(const char* per_node, const char* per_cpu, const char* cpus_on_node);
// MemTotal of /proc/meminfo, in MiB.
std::optional<std::uint64_t> meminfo_total_mb(std::string_view meminfo);

// The lowest of the three on this node; 0 when none can be read.
std::uint64_t job_memory_mb();

}  // namespace lhpc
