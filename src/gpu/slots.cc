#include "gpu/slots.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "util/error.h"
#include "util/strings.h"

namespace lhpc::gpu {

namespace {

namespace fs = std::filesystem;

std::string visible_var(Vendor vendor) {
  return vendor == Vendor::nvidia ? "CUDA_VISIBLE_DEVICES" : "ROCR_VISIBLE_DEVICES";
}

// "0,1,3" -> {"0","1","3"}; Slurm writes "NoDevFiles" for a gres without
// device files: no GPU to hand out.
std::vector<std::string> parse_list(const std::string& value) {
  std::vector<std::string> ids;
  if (trim(value) == "NoDevFiles") {
    return ids;
  }
  for (const auto& piece : split(value, ',')) {
    auto id = trim(piece);
    if (!id.empty()) {
      ids.push_back(id);
    }
  }
  return ids;
}

std::vector<std::string> numbered(std::size_t count) {
  std::vector<std::string> ids;
  for (std::size_t i = 0; i < count; ++i) {
    ids.push_back(std::to_string(i));
  }
  return ids;
}

std::vector<fs::path> sorted_entries(const fs::path& dir) {
  std::vector<fs::path> entries;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    entries.push_back(it->path());
  }
  std::sort(entries.begin(), entries.end());
  return entries;
}

// KFD topology nodes are numbered 0..N-1; sort by number, not by text.
bool is_amd_gpu_node(const fs::path& node) {
  std::ifstream in(node / "gpu_id");
  long long gpu_id = 0;
  return (in >> gpu_id) && gpu_id != 0;
}

std::size_t count_amd_gpus(const fs::path& nodes_dir) {
  std::size_t count = 0;
  for (int i = 0;; ++i) {
    fs::path node = nodes_dir / std::to_string(i);
    std::error_code ec;
    if (!fs::is_directory(node, ec)) {
      return count;
    }
    count += is_amd_gpu_node(node) ? 1 : 0;
  }
}

}  // namespace

std::optional<Devices> from_slurm(const Env& env, Vendor vendor) {
  for (const auto& var : {visible_var(vendor), std::string("SLURM_STEP_GPUS"), std::string("SLURM_JOB_GPUS")}) {
    if (auto value = env.get(var)) {
      return Devices{parse_list(*value), var};
    }
  }
  return std::nullopt;
}

Devices from_node(Vendor vendor, const std::string& root) {
  if (vendor == Vendor::nvidia) {
    fs::path dir = fs::path(root) / "proc/driver/nvidia/gpus";
    return Devices{numbered(sorted_entries(dir).size()), "/proc/driver/nvidia/gpus"};
  }
  fs::path dir = fs::path(root) / "sys/class/kfd/kfd/topology/nodes";
  return Devices{numbered(count_amd_gpus(dir)), "/sys/class/kfd/kfd/topology/nodes"};
}

Devices discover(const Env& env, Vendor vendor, const std::string& root) {
  if (auto devices = from_slurm(env, vendor)) {
    return *devices;
  }
  if (env.get("SLURM_JOB_ID")) {
    // slurmd removes the vendor's variable from a job given no GPUs: what the
    // node shows then may be other jobs' GPUs.
    return {{}, "Slurm gave this job no GPUs on this node"};
  }
  return from_node(vendor, root);
}

std::vector<std::vector<std::string>> split_slots(const Devices& devices, int per_slot, Vendor vendor) {
  if (per_slot < 1) {
    throw Error(Exit::config, "gpus_per_slot is " + std::to_string(per_slot) + ": a GPU slot needs at least 1 GPU",
                "set gpus_per_slot to 1 or more, or leave it unset for a CPU runtime");
  }
  std::size_t slots = devices.ids.size() / static_cast<std::size_t>(per_slot);
  if (slots == 0) {
    throw Error(Exit::engine,
                "a GPU runtime needs " + std::to_string(per_slot) + " " +
                    std::string(config::k_gpu_vendor_names.text(vendor)) + " GPU(s) per slot, but " +
                    std::to_string(devices.ids.size()) + " were found (" + devices.source + ")",
                "ask Slurm for GPUs (--gpus-per-node=N or --gres=gpu:N) on a partition that has them; where Slurm "
                "does not manage GPUs, set CUDA_VISIBLE_DEVICES (ROCR_VISIBLE_DEVICES) in the job to those it may use");
  }
  std::vector<std::vector<std::string>> groups(slots);
  for (std::size_t k = 0; k < slots; ++k) {
    auto first = devices.ids.begin() + static_cast<std::ptrdiff_t>(k * static_cast<std::size_t>(per_slot));
    groups[k].assign(first, first + per_slot);
  }
  return groups;
}

std::vector<std::vector<std::string>> share_of(const std::vector<std::vector<std::string>>& groups, int ranks,
                                               int index) {
  const std::size_t n = groups.size();
  const std::size_t r = static_cast<std::size_t>(std::max(ranks, 1));
  const std::size_t i = static_cast<std::size_t>(std::clamp(index, 0, static_cast<int>(r) - 1));
  const std::size_t base = n / r;
  const std::size_t extra = n % r;
  const std::size_t first = i * base + std::min(i, extra);
  const std::size_t count = base + (i < extra ? 1 : 0);
  if (count == 0) {
    throw Error(Exit::engine,
                std::to_string(n) + " GPU slot(s) on this node for " + std::to_string(r) + " ranks: rank " +
                    std::to_string(i) + " of the node has none",
                "run one rank per node (--ntasks-per-node=1) or ask for more GPUs");
  }
  auto from = groups.begin() + static_cast<std::ptrdiff_t>(first);
  return {from, from + static_cast<std::ptrdiff_t>(count)};
}

std::map<std::string, std::string> slot_env(Vendor vendor, const std::vector<std::string>& group) {
  std::string list = join(group, ",");
  if (vendor == Vendor::nvidia) {
    return {{"CUDA_VISIBLE_DEVICES", list}, {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"}};
  }
  return {{"ROCR_VISIBLE_DEVICES", list}};
}

std::string engine_flag(Vendor vendor, bool nvccli) {
  if (vendor == Vendor::amd) {
    return "--rocm";
  }
  return nvccli ? "--nvccli" : "--nv";
}

std::string sbatch_request(int slots, int per_slot, bool gres) {
  std::string count = std::to_string(slots * per_slot);
  return gres ? "--gres=gpu:" + count : "--gpus-per-node=" + count;
}

}  // namespace lhpc::gpu
