// `lithops-hpc deploy [--sif PATH] ...`: the MPI program run by srun or mpirun
// (or alone: one rank, a complete local deployment).
#include "cli/cli.h"
#include "deploy/deploy.h"
#include "util/error.h"

namespace lhpc::cli {

namespace {

struct DeployArgs {
  std::string sif, transfer, mode, engine, sif_path, status_file, logs_dir, runtime;
  int slots = -1;
  double interval = -1;
  bool cleanup = false;
  GpuFlags gpu;
};

// The flags' checks (cli::choice) already refused a bad value.
template <typename E, std::size_t N>
std::optional<E> parsed(const std::string& text, const Names<E, N>& names) {
  return text.empty() ? std::nullopt : names.parse(text);
}

Exit run_deploy(const Globals& g, const DeployArgs& a) {
  deploy::Options o;
  o.sif = a.sif;
  o.transfer = parsed(a.transfer, config::k_transfer_names);
  o.mode = parsed(a.mode, config::k_mode_names);
  o.engine = parsed(a.engine, config::k_engine_names);
  if (a.slots >= 0) {
    o.slots = a.slots;
  }
  if (!a.sif_path.empty()) {
    o.sif_path = a.sif_path;
  }
  if (!a.status_file.empty()) {
    o.status_file = a.status_file;
  }
  if (a.interval > 0) {
    o.interval = a.interval;
  }
  if (!a.logs_dir.empty()) {
    o.logs_dir = a.logs_dir;
  }
  o.cleanup = a.cleanup;
  auto cfg = load_config(g);
  if (!a.runtime.empty()) {
    cfg.singularity.runtime = a.runtime;  // also names the image when no --sif is given
  }
  apply_gpu_flags(a.gpu, cfg);
  if (o.sif.empty() && o.engine.value_or(cfg.singularity.engine) != config::Engine::host) {
    auto named = cfg;
    if (!a.sif_path.empty()) {
      named.singularity.sif_path = a.sif_path;
    }
    o.sif = config::image_path(named);  // <sif_path>/<runtime>.sif, as Lithops names it
  }
  // Every rank resolves it alike, from the same flags, files and image path.
  cfg.singularity.runtime = config::served_runtime(cfg, o.sif);
  return deploy::run(cfg, o);
}

}  // namespace

void register_deploy(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* d = parent.add_subcommand(
      "deploy", "stage the image on every node and run a worker per rank (launch with srun or mpirun)");
  auto a = std::make_shared<DeployArgs>();
  d->add_option(
       "--sif", a->sif,
       "the runtime image, as rank 0 sees it (default: <sif_path>/<runtime>.sif; not needed with the host engine)")
      ->type_name("PATH");
  d->add_option("--runtime", a->runtime,
                "the Lithops runtime this deployment serves, and the image <sif_path>/NAME.sif when no --sif is "
                "given (singularity.runtime; default: the image's name without .sif)")
      ->check(choice(config::runtime_name_error))
      ->type_name("NAME");
  d->add_option("--transfer", a->transfer, "how the image reaches the nodes: mpi, sbcast or none (deploy.transfer)")
      ->check(choice(config::k_transfer_names))
      ->type_name("HOW");
  d->add_option("--mode", a->mode, "dispatch or runscript (deploy.mode)")
      ->check(choice(config::k_mode_names))
      ->type_name("MODE");
  d->add_option("--engine", a->engine, "singularity, apptainer or host (singularity.engine)")
      ->check(choice(config::k_engine_names))
      ->type_name("ENGINE");
  d->add_option("--slots", a->slots,
                "task slots per node, split among its ranks; 0: the cores (singularity.worker_processes)")
      ->type_name("N");
  d->add_option("--sif-path", a->sif_path, "node-local directory to stage into (singularity.sif_path)")
      ->type_name("DIR");
  d->add_option("--status-file", a->status_file, "where rank 0 writes the status JSON (health.status_file)")
      ->type_name("FILE");
  d->add_option("--interval", a->interval, "seconds between health reports (health.interval)")->type_name("SECONDS");
  d->add_option("--logs-dir", a->logs_dir,
                "where handler output goes: node (node-local, the default), state (the job's state directory) "
                "or an absolute path (logs.dir)")
      ->check(choice(config::logs_dir_error))
      ->type_name("WHERE");
  d->add_flag("--cleanup", a->cleanup, "remove the staged images when the deployment ends (deploy.cleanup)");
  add_gpu_flags(d, a->gpu);
  actions.push_back({d, [&g, a] { return run_deploy(g, *a); }});
}

}  // namespace lhpc::cli
