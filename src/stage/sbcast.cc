#include "stage/sbcast.h"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "stage/agreement.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/strings.h"

namespace lhpc::stage {

void check_sbcast_usable() {
  const char* job = std::getenv("SLURM_JOB_ID");
  if (job == nullptr || *job == '\0') {
    throw Error(Exit::usage, "--transfer sbcast needs a Slurm allocation (SLURM_JOB_ID is not set)",
                "run inside sbatch/salloc, or use --transfer mpi");
  }
  if (!find_in_path("sbcast")) {
    throw Error(Exit::usage, "--transfer sbcast: sbcast is not in PATH", "load Slurm's module or use --transfer mpi");
  }
}

void check_sbcast_layout(const std::vector<std::string>& names, const std::vector<std::string>& dirs) {
  for (std::size_t n = 1; n < dirs.size(); ++n) {
    if (dirs[n] != dirs[0]) {
      throw Error(Exit::usage,
                  "--transfer sbcast writes the same path on every node, but sif_path differs between nodes (" +
                      dirs[0] + " on " + names[0] + ", " + dirs[n] + " on " + names[n] + ")",
                  "drop %n from sif_path, or use --transfer mpi");
    }
  }
  const char* nn = std::getenv("SLURM_JOB_NUM_NODES");
  if (nn == nullptr) {
    nn = std::getenv("SLURM_NNODES");
  }
  if (nn != nullptr && std::atoi(nn) != static_cast<int>(names.size())) {
    throw Error(Exit::usage,
                "--transfer sbcast writes to all " + std::string(nn) + " nodes of the allocation, but ranks run on " +
                    std::to_string(names.size()) + " of them",
                "start one rank on every node (srun --ntasks-per-node=1), or use --transfer mpi");
  }
}

Env sbcast_env(Env ours) {
  ours.unset("AMQP_URL");
  return ours;
}

Outcome run_sbcast(const Options& o, const std::string& dest) {
  std::vector<std::string> argv = {"sbcast"};
  if (o.compress) {
    argv.push_back("--compress");
  }
  argv.insert(argv.end(), {"--force", o.source, dest});
  UniqueFd out(::memfd_create("sbcast-output", MFD_CLOEXEC));
  spdlog::info("running {}", join_argv(argv));
  auto child = spawn({.argv = argv, .env = sbcast_env(Env::current()), .stdout_fd = out.get(), .stderr_fd = out.get()});
  while (!child.try_wait()) {
    if (auto sig = signal_exit()) {
      child.terminate(std::chrono::seconds(2));
      return failed(*sig, "interrupted by " + signal_name(*sig) + " while sbcast ran");
    }
    if (o.tick) {
      o.tick();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (child.status() && (!WIFEXITED(*child.status()) || WEXITSTATUS(*child.status()) != 0)) {
    std::string text(4096, '\0');
    ssize_t n = ::pread(out.get(), text.data(), text.size(), 0);
    text.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    return failed(Exit::stage, join_argv(argv) + " " + describe_status(*child.status()) + ": " + trim(text),
                  "check that the job's nodes can reach the file and that the directory exists on every node");
  }
  return ok();
}

}  // namespace lhpc::stage
