// The command line: CLI11 parsing and dispatch to the library. No logic here
// beyond turning options into calls; each subcommand lives in cmd_<name>.cc.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "health/status_file.h"
#include "util/error.h"
#include "util/names.h"

namespace lhpc::cli {

struct Globals {
  std::string config_path;
  std::string log_level = "info";
  bool verbose = false;
};

// A leaf subcommand and what runs when it was given: it returns how the
// command ended or throws lhpc::Error; main.cc alone makes the number.
struct Action {
  CLI::App* app;
  std::function<Exit()> run;
};

// Each registers its subcommands under `parent` and appends its actions.
using Register = void (*)(CLI::App& parent, Globals& g, std::vector<Action>& actions);

// A CLI11 check refusing a flag value through the config's own check (an
// enum's names, e.g. config::k_transfer_names, or config::logs_dir_error), so
// the flag and the TOML key say the same thing.
CLI::Validator choice(std::string (*error)(const std::string&));
template <typename E, std::size_t N>
CLI::Validator choice(const Names<E, N>& names) {
  // No description: the option's help already lists the choices.
  return CLI::Validator([&names](std::string& text) { return names.error(text); }, "");
}

// --gpus-per-slot N and --gpu-vendor VENDOR, the same on worker, deploy and
// autoalloc: they override singularity.gpus_per_slot and gpu_vendor.
struct GpuFlags {
  int gpus_per_slot = -1;  // -1: not given
  std::string vendor;      // empty: not given
};
void add_gpu_flags(CLI::App* app, GpuFlags& flags);
void apply_gpu_flags(const GpuFlags& flags, config::Config& cfg);

// Loads the configuration the globals point at and logs its warnings.
config::Config load_config(const Globals& g);

// The deployment `status`/`stop` mean (see health::find_deployment); throws
// Error(no_deployment) naming where it looked when there is none.
health::Found require_deployment(const std::string& job);

// `stop --all`: asks every running deployment to stop and waits up to
// `timeout` seconds (cmd_stop.cc; `down` uses it too); throws Error(failure)
// naming those that did not stop, Error(no_deployment) when there is none.
Exit stop_all_deployments(double timeout);

// This executable (/proc/self/exe): what `up` starts as the controller and
// what the local scheduler runs `deploy` with.
std::string self_exe();

Exit run(int argc, char** argv);

}  // namespace lhpc::cli
