#include "cli/cli.h"

#include <unistd.h>

#include <spdlog/spdlog.h>
#include <climits>

#include "lhpc_build_config.h"
#include "util/error.h"
#include "util/log.h"

namespace lhpc::cli {

// One line per subcommand group; the order is the order of --help.
void register_config(CLI::App&, Globals&, std::vector<Action>&);
void register_sif(CLI::App&, Globals&, std::vector<Action>&);
void register_runtime(CLI::App&, Globals&, std::vector<Action>&);
void register_status(CLI::App&, Globals&, std::vector<Action>&);
void register_stop(CLI::App&, Globals&, std::vector<Action>&);
void register_logs(CLI::App&, Globals&, std::vector<Action>&);
void register_worker(CLI::App&, Globals&, std::vector<Action>&);
void register_ping(CLI::App&, Globals&, std::vector<Action>&);
void register_stage(CLI::App&, Globals&, std::vector<Action>&);
void register_deploy(CLI::App&, Globals&, std::vector<Action>&);
void register_autoalloc(CLI::App&, Globals&, std::vector<Action>&);
void register_up(CLI::App&, Globals&, std::vector<Action>&);

namespace {
const Register k_commands[] = {
    register_up,  register_runtime, register_stage, register_deploy, register_autoalloc, register_config,
    register_sif, register_status,  register_stop,  register_logs,   register_worker,    register_ping,
};
}  // namespace

config::Config load_config(const Globals& g) {
  auto cfg = config::load(g.config_path);
  for (const auto& w : cfg.warnings) {
    spdlog::warn("{}", w);
  }
  return cfg;
}

CLI::Validator choice(std::string (*error)(const std::string&)) {
  // No description: the option's help already lists the choices.
  return CLI::Validator([error](std::string& text) { return error(text); }, "");
}

void add_gpu_flags(CLI::App* app, GpuFlags& flags) {
  app->add_option("--gpus-per-slot", flags.gpus_per_slot,
                  "GPUs each slot owns; slots are whole groups of the node's GPUs; 0: a CPU runtime "
                  "(singularity.gpus_per_slot)")
      ->check(CLI::Range(0, 64))
      ->type_name("N");
  app->add_option("--gpu-vendor", flags.vendor, "nvidia (default) or amd (singularity.gpu_vendor)")
      ->check(choice(config::k_gpu_vendor_names))
      ->type_name("VENDOR");
}

void apply_gpu_flags(const GpuFlags& flags, config::Config& cfg) {
  if (flags.gpus_per_slot >= 0) {
    cfg.singularity.gpus_per_slot = flags.gpus_per_slot;
    cfg.set_by_flag("singularity.gpus_per_slot", "--gpus-per-slot");
  }
  if (!flags.vendor.empty()) {  // the flag's check (cli::choice) already refused a bad value
    cfg.singularity.gpu_vendor = config::k_gpu_vendor_names.parse(flags.vendor).value();
    cfg.set_by_flag("singularity.gpu_vendor", "--gpu-vendor");
  }
}

namespace {

// "lithops-hpc runtime build": the commands the parse got to, for hints.
std::string command_path(const CLI::App& app) {
  std::string path = app.get_name();
  const CLI::App* at = &app;
  while (!at->get_subcommands().empty()) {
    at = at->get_subcommands().front();
    path += " " + at->get_name();
  }
  return path;
}

const CLI::App& deepest(const CLI::App& app) {
  const CLI::App* at = &app;
  while (!at->get_subcommands().empty()) {
    at = at->get_subcommands().front();
  }
  return *at;
}

// A parse error as the user should read it. A group (lithops-hpc, runtime,
// config, sif) given without its command gets the commands it has, rather
// than CLI11's "A subcommand is required".
Error usage_error(const CLI::App& app, const CLI::ParseError& e) {
  auto path = command_path(app);
  const auto& at = deepest(app);
  std::string what = e.what();
  if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr && !at.get_subcommands({}).empty()) {
    std::string names;
    for (const auto* s : at.get_subcommands({})) {
      names += (names.empty() ? "" : ", ") + s->get_name();
    }
    what = path + " needs a command: " + names;
  }
  return Error(Exit::usage, what, "see " + path + " --help");
}

}  // namespace

health::Found require_deployment(const std::string& job) {
  auto look = health::find_deployment(job);
  if (!look.found) {
    throw Error(Exit::no_deployment, "no deployment found (looked in " + look.looked + ")",
                "start one (sbatch lithops-deploy.sh, or lithops-hpc deploy), or name its job id; "
                "LITHOPS_HPC_STATE_DIR must be the same as the deployment's");
  }
  return std::move(*look.found);
}

std::string self_exe() {
  char buf[PATH_MAX];
  auto n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) {
    throw Error(Exit::failure, "cannot find this executable (/proc/self/exe)");
  }
  return std::string(buf, static_cast<std::size_t>(n));
}

Exit run(int argc, char** argv) {
  setup_logging("info");  // errors while parsing still go to stderr with our pattern
  CLI::App app{"lithops-hpc: run Lithops workers on HPC clusters (Slurm, MPI, Singularity/Apptainer)"};
  app.name("lithops-hpc");
  app.set_version_flag("--version", std::string("lithops-hpc ") + LHPC_VERSION);
  app.require_subcommand(1);
  app.fallthrough();  // global options may follow the subcommand
  Globals g;
  app.add_option("--config", g.config_path, "configuration file (see lithops-hpc.toml(5))")->type_name("FILE");
  app.add_option("--log-level", g.log_level, "trace, debug, info, warn, error, critical or off")->type_name("LEVEL");
  app.add_flag("-v,--verbose", g.verbose, "more detail in logs (same as --log-level debug)");

  std::vector<Action> actions;
  for (auto reg : k_commands) {
    reg(app, g, actions);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) {  // --help, --version: printed, success
      app.exit(e);
      return Exit::ok;
    }
    throw usage_error(app, e);
  }
  setup_logging(g.verbose && g.log_level == "info" ? "debug" : g.log_level);
  for (auto& a : actions) {
    if (a.app->parsed()) {
      return a.run();
    }
  }
  // Every group requires its command (require_subcommand), so CLI11 refused
  // a command line that reaches here.
  throw Error(Exit::failure, "internal error: no command ran for " + command_path(app));
}

}  // namespace lhpc::cli
