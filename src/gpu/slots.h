// GPU slots: which GPUs this node's job may use, and how they are split into
// slots of whole GPUs, each handler seeing only its own. Pure functions over
// the environment and a root directory, so they are tested without a GPU;
// the worker applies them (engine flag, one environment per slot).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "util/process.h"

namespace lhpc::gpu {

// The vendor is a configuration value (singularity.gpu_vendor); its names
// are config::k_gpu_vendor_names.
using Vendor = config::GpuVendor;

// The GPUs one node's job may use, in the order the vendor's runtime
// numbers them, and where that list came from (for status and messages).
struct Devices {
  std::vector<std::string> ids;  // indices ("0"), UUIDs ("GPU-…") or MIG ids, as the source wrote them
  std::string source;            // "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "/proc/driver/nvidia/gpus", …
};

// What Slurm gave the job on this node. The vendor's own variable first
// (CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES): Slurm sets it for the step
// and numbers it for the job's device cgroup, so it is what the runtime
// sees. Else SLURM_STEP_GPUS, then SLURM_JOB_GPUS (the node's own indices:
// right where no device cgroup renumbers). nullopt when none is set; an
// empty set (Slurm's "NoDevFiles", or "") is a set with no GPU.
std::optional<Devices> from_slurm(const Env& env, Vendor vendor);

// What the node shows under `root` ("/" in production): NVIDIA's
// proc/driver/nvidia/gpus/<PCI address> directories in PCI bus order (the
// numbering under CUDA_DEVICE_ORDER=PCI_BUS_ID); AMD's
// sys/class/kfd/kfd/topology/nodes/*/gpu_id that are not 0 (the CPU
// nodes), in node order.
Devices from_node(Vendor vendor, const std::string& root = "/");

// Slurm's word first, else the node's, but only outside a Slurm job: in a
// job with none of Slurm's variables the set is empty (the job was given
// no GPUs; the node's may be other jobs').
Devices discover(const Env& env, Vendor vendor, const std::string& root = "/");

// Whole groups of `per_slot` GPUs, slot k taking devices [k*per_slot,
// (k+1)*per_slot); GPUs left over are not used. Throws Error(Exit::config)
// when `per_slot` < 1 and Error(Exit::engine) when fewer GPUs than one slot
// needs are there, naming how many were found and where.
std::vector<std::vector<std::string>> split_slots(const Devices& devices, int per_slot, Vendor vendor);

// The groups of one of `ranks` ranks sharing a node (`index` 0-based):
// contiguous, the first `groups % ranks` ranks taking one more. Throws
// Error(Exit::engine) when this rank's share is empty (more ranks than slots).
std::vector<std::vector<std::string>> share_of(const std::vector<std::vector<std::string>>& groups, int ranks,
                                               int index);

// The variables slot `group`'s handler alone gets: CUDA_VISIBLE_DEVICES and
// CUDA_DEVICE_ORDER=PCI_BUS_ID (NVIDIA), ROCR_VISIBLE_DEVICES (AMD).
std::map<std::string, std::string> slot_env(Vendor vendor, const std::vector<std::string>& group);

// The engine's switch that makes the vendor's driver visible in the
// container: --nv, or --nvccli where the site configured it; --rocm.
std::string engine_flag(Vendor vendor, bool nvccli = false);

// What autoalloc asks Slurm for: --gpus-per-node=N for `slots` slots of
// `per_slot` GPUs, or --gres=gpu:N where the site wants gres.
std::string sbatch_request(int slots, int per_slot, bool gres = false);

}  // namespace lhpc::gpu
