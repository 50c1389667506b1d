// GPU memory in use, where nvidia-smi exists: one query per health interval
// at most, bounded in time, so `status` shows each GPU's memory next to the
// slot that holds it. Nothing here decides anything: an absent, slow or
// failing nvidia-smi is simply no figure.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lhpc::gpu {

struct Memory {
  std::string index;  // nvidia-smi's index (in a job's device cgroup: renumbered like CUDA_VISIBLE_DEVICES)
  std::string uuid;   // "GPU-…"
  std::uint64_t used_mib = 0;
  std::uint64_t total_mib = 0;
};

// The lines of `nvidia-smi --query-gpu=index,uuid,memory.used,memory.total
// --format=csv,noheader,nounits`; a line that does not read is skipped.
std::vector<Memory> parse_nvidia_smi(const std::string& csv);

// Runs that query (nvidia-smi from PATH); empty when it is not there, fails
// or has not answered within `limit` (then it is killed).
std::vector<Memory> query_nvidia_smi(std::chrono::milliseconds limit = std::chrono::milliseconds(2000));

// Each device of `slots`, in order (slot 0's first): its figures, matched by
// index or UUID as the slot names it; nullopt where the query did not list it.
std::vector<std::optional<Memory>> memory_of(const std::vector<std::vector<std::string>>& slots,
                                             const std::vector<Memory>& known);

}  // namespace lhpc::gpu
