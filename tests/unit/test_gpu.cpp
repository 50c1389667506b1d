// GPU slots: what Slurm or the node gives, split into whole-GPU slots, each
// slot's own environment, and what the engine and sbatch are asked for.
#include <doctest/doctest.h>

#include <filesystem>
#include <set>

#include "gpu/slots.h"
#include "test_support.h"
#include "util/error.h"

using namespace lhpc;
using lhpc::gpu::Vendor;

namespace {

Env env_with(std::initializer_list<std::pair<std::string, std::string>> vars) {
  Env env = Env::empty();
  for (const auto& [k, v] : vars) {
    env.set(k, v);
  }
  return env;
}

}  // namespace

TEST_CASE("the GPUs Slurm gave the step come first, then the step's and the job's lists") {
  auto both = env_with({{"CUDA_VISIBLE_DEVICES", "0,1"}, {"SLURM_JOB_GPUS", "4,5"}});
  auto devices = gpu::from_slurm(both, Vendor::nvidia);
  REQUIRE(devices);
  CHECK(devices->ids == std::vector<std::string>{"0", "1"});
  CHECK(devices->source == "CUDA_VISIBLE_DEVICES");

  auto job_only = gpu::from_slurm(env_with({{"SLURM_STEP_GPUS", "2, 3"}, {"SLURM_JOB_GPUS", "4"}}), Vendor::nvidia);
  REQUIRE(job_only);
  CHECK(job_only->ids == std::vector<std::string>{"2", "3"});
  CHECK(job_only->source == "SLURM_STEP_GPUS");

  CHECK_FALSE(gpu::from_slurm(Env::empty(), Vendor::nvidia));
}

TEST_CASE("AMD reads ROCR_VISIBLE_DEVICES, not CUDA's variable") {
  auto env = env_with({{"CUDA_VISIBLE_DEVICES", "0"}, {"ROCR_VISIBLE_DEVICES", "1,2"}});
  auto devices = gpu::from_slurm(env, Vendor::amd);
  REQUIRE(devices);
  CHECK(devices->ids == std::vector<std::string>{"1", "2"});
}

TEST_CASE("Slurm's NoDevFiles and an empty list are a set with no GPU, not a fall-back to the node") {
  test::TempDir root("gpu");
  std::filesystem::create_directories(root.file("proc/driver/nvidia/gpus/0000:3b:00.0"));
  auto devices = gpu::discover(env_with({{"CUDA_VISIBLE_DEVICES", "NoDevFiles"}}), Vendor::nvidia, root.str());
  CHECK(devices.ids.empty());
  CHECK(gpu::discover(env_with({{"CUDA_VISIBLE_DEVICES", ""}}), Vendor::nvidia, root.str()).ids.empty());
}

TEST_CASE("a Slurm job given no GPUs takes none of the node's: they may be other jobs'") {
  // On a GPU node slurmd removes CUDA_VISIBLE_DEVICES from a job that asked
  // for no GPUs; the node still shows all four.
  test::TempDir root("gpu");
  for (auto pci : {"0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0", "0000:af:00.0"}) {
    std::filesystem::create_directories(root.file(std::string("proc/driver/nvidia/gpus/") + pci));
  }
  auto devices = gpu::discover(env_with({{"SLURM_JOB_ID", "42"}}), Vendor::nvidia, root.str());
  CHECK(devices.ids.empty());
  CHECK(devices.source == "Slurm gave this job no GPUs on this node");
  try {
    gpu::split_slots(devices, 1, Vendor::nvidia);
    FAIL("no slot without GPUs");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::engine);
    CHECK(std::string(e.what()).find("0 were found (Slurm gave this job no GPUs") != std::string::npos);
    CHECK(e.hint().find("CUDA_VISIBLE_DEVICES") != std::string::npos);
  }
  // What the job script sets is Slurm's word too.
  CHECK(gpu::discover(env_with({{"SLURM_JOB_ID", "42"}, {"CUDA_VISIBLE_DEVICES", "2"}}), Vendor::nvidia, root.str())
            .ids == std::vector<std::string>{"2"});
}

TEST_CASE("without Slurm's word the node's GPUs are numbered in PCI bus order") {
  test::TempDir root("gpu");
  for (auto pci : {"0000:af:00.0", "0000:3b:00.0", "0000:86:00.0", "0000:5e:00.0"}) {
    std::filesystem::create_directories(root.file(std::string("proc/driver/nvidia/gpus/") + pci));
  }
  auto devices = gpu::discover(Env::empty(), Vendor::nvidia, root.str());
  CHECK(devices.ids == std::vector<std::string>{"0", "1", "2", "3"});
  CHECK(devices.source == "/proc/driver/nvidia/gpus");
  CHECK(gpu::from_node(Vendor::nvidia, root.file("nowhere")).ids.empty());
}

TEST_CASE("AMD GPUs are the KFD topology nodes whose gpu_id is not 0") {
  test::TempDir root("gpu");
  const std::string nodes = "sys/class/kfd/kfd/topology/nodes/";
  for (auto [n, id] : std::vector<std::pair<int, std::string>>{{0, "0"}, {1, "4466"}, {2, "53815"}, {10, "9"}}) {
    std::filesystem::create_directories(root.file(nodes + std::to_string(n)));
    root.write(nodes + std::to_string(n) + "/gpu_id", id + "\n");
  }
  // Node 10 is past a gap (no node 3): the kernel numbers nodes without gaps.
  CHECK(gpu::from_node(Vendor::amd, root.str()).ids == std::vector<std::string>{"0", "1"});
}

TEST_CASE("four GPUs make four slots of one, each its own device, no two sharing") {
  gpu::Devices devices{{"0", "1", "2", "3"}, "CUDA_VISIBLE_DEVICES"};
  auto slots = gpu::split_slots(devices, 1, Vendor::nvidia);
  REQUIRE(slots.size() == 4);
  std::set<std::string> seen;
  for (const auto& group : slots) {
    REQUIRE(group.size() == 1);
    CHECK(seen.insert(group[0]).second);
  }
}

TEST_CASE("two GPUs per slot on a 4-GPU node give 2 slots; a fifth GPU is left unused") {
  gpu::Devices devices{{"GPU-a", "GPU-b", "GPU-c", "GPU-d", "GPU-e"}, "CUDA_VISIBLE_DEVICES"};
  auto slots = gpu::split_slots(devices, 2, Vendor::nvidia);
  REQUIRE(slots.size() == 2);
  CHECK(slots[0] == std::vector<std::string>{"GPU-a", "GPU-b"});
  CHECK(slots[1] == std::vector<std::string>{"GPU-c", "GPU-d"});
}

TEST_CASE("a GPU runtime on a node without enough GPUs fails at start, saying how many and where") {
  gpu::Devices none{{}, "/proc/driver/nvidia/gpus"};
  try {
    gpu::split_slots(none, 1, Vendor::nvidia);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::engine);
    CHECK(std::string(e.what()).find("0 were found (/proc/driver/nvidia/gpus)") != std::string::npos);
    CHECK(e.hint().find("--gpus-per-node") != std::string::npos);
  }
  CHECK_THROWS_AS(gpu::split_slots(gpu::Devices{{"0"}, "x"}, 2, Vendor::nvidia), Error);
  CHECK_THROWS_AS(gpu::split_slots(gpu::Devices{{"0"}, "x"}, 0, Vendor::nvidia), Error);
}

TEST_CASE("a slot's handler environment names its own devices in PCI bus order") {
  auto nv = gpu::slot_env(Vendor::nvidia, {"2", "3"});
  CHECK(nv.at("CUDA_VISIBLE_DEVICES") == "2,3");
  CHECK(nv.at("CUDA_DEVICE_ORDER") == "PCI_BUS_ID");
  auto amd = gpu::slot_env(Vendor::amd, {"1"});
  CHECK(amd.at("ROCR_VISIBLE_DEVICES") == "1");
  CHECK(amd.count("CUDA_VISIBLE_DEVICES") == 0);
}

TEST_CASE("the engine flag and the sbatch request follow the vendor and the slot size") {
  CHECK(gpu::engine_flag(Vendor::nvidia) == "--nv");
  CHECK(gpu::engine_flag(Vendor::nvidia, true) == "--nvccli");
  CHECK(gpu::engine_flag(Vendor::amd) == "--rocm");
  CHECK(gpu::sbatch_request(4, 2) == "--gpus-per-node=8");
  CHECK(gpu::sbatch_request(2, 1, true) == "--gres=gpu:2");
}

TEST_CASE("a vendor name is checked with the choices listed") {
  CHECK(config::k_gpu_vendor_names.parse("amd") == Vendor::amd);
  CHECK(config::k_gpu_vendor_names.text(Vendor::nvidia) == "nvidia");
  CHECK(config::k_gpu_vendor_names.error("intel") == "'intel' is not one of nvidia, amd");
}

TEST_CASE("ranks sharing a node split its GPU slots") {
  auto groups = std::vector<std::vector<std::string>>{{"0"}, {"1"}, {"2"}};
  CHECK(gpu::share_of(groups, 2, 0) == std::vector<std::vector<std::string>>{{"0"}, {"1"}});
  CHECK(gpu::share_of(groups, 2, 1) == std::vector<std::vector<std::string>>{{"2"}});
  CHECK_THROWS_AS(gpu::share_of(groups, 4, 3), Error);
}
