// `lithops-hpc worker [--sif PATH] [--mode dispatch|runscript] [--slots N]`:
// one node's worker without MPI (deploy runs the same loop on every rank).
// Exit 0 after a drain (SIGINT/SIGTERM); 6 when the instance, the handlers
// or the runscript cannot be kept running; 3 for a bad configuration.
#include <signal.h>

#include <memory>

#include <spdlog/spdlog.h>

#include "cli/cli.h"
#include "config/image_labels.h"
#include "health/status_file.h"
#include "logs/place.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/signals.h"
#include "worker/worker.h"

namespace lhpc::cli {

namespace {

struct WorkerOpts {
  std::string sif;
  std::string mode;
  std::string engine;
  std::string runtime;
  int slots = 0;
  GpuFlags gpu;
};

// One rank (0) on this node: where its handler log is, for `lithops-hpc logs`.
void record_logs(const config::Config& cfg) {
  auto ph = config::current_placeholders();
  try {
    auto place = logs::record_place(cfg.logs.dir, ph.jobid, static_cast<std::uint64_t>(cfg.logs.max_bytes), {ph.node});
    spdlog::info("handler output: {}/{}; read it with: lithops-hpc logs {}", place.dir, logs::file_name(0), ph.jobid);
  } catch (const Error& e) {
    spdlog::warn("lithops-hpc logs will not find this worker's handler log: {}", e.what());
  }
}

Exit run_worker(const Globals& g, const WorkerOpts& o) {
  // Signals first: one arriving while the instance starts is kept for the loop.
  SignalPipe signals{SIGINT, SIGTERM};
  auto loaded = load_config(g);  // image_path expands placeholders itself
  if (!o.runtime.empty()) {
    loaded.singularity.runtime = o.runtime;  // also names the image when no --sif is given
  }
  auto cfg = config::expanded(loaded, config::current_placeholders());
  // The flags' checks (cli::choice) already refused a bad value.
  if (!o.mode.empty()) {
    cfg.deploy.mode = config::k_mode_names.parse(o.mode).value();
  }
  if (!o.engine.empty()) {
    cfg.singularity.engine = config::k_engine_names.parse(o.engine).value();
  }
  apply_gpu_flags(o.gpu, cfg);
  if (o.slots < 0) {
    throw Error(Exit::usage, "--slots must be 1 or more (0: worker_processes, else the node's cores)");
  }
  std::string sif = o.sif;
  if (cfg.singularity.engine != config::Engine::host) {
    if (sif.empty()) {
      sif = config::image_path(loaded);  // <sif_path>/<runtime>.sif, as Lithops names it
    }
    if (!path_exists(sif)) {
      throw Error(Exit::image, "no image at " + sif, "give the path of a .sif file readable on this node");
    }
    config::apply_image_labels(cfg, sif);  // GPU settings no flag or key gave
  }
  config::require_amqp_url(cfg);
  cfg.singularity.runtime = config::served_runtime(cfg, sif);
  // It names the instance, the handler log's place and the in-flight record:
  // checked as deploy checks it, before any of them is made.
  health::check_job_id(config::current_placeholders().jobid);

  record_logs(cfg);
  worker::Worker worker(cfg, worker::WorkerIdentity{.slots = o.slots});
  worker.set_signal_pipe(&signals);
  worker.start(sif);
  while (!worker.finished()) {
    worker.step(std::chrono::milliseconds(1000));
  }
  worker.stop();
  return worker.failed() ? Exit::engine : Exit::ok;
}

}  // namespace

void register_worker(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* w = parent.add_subcommand("worker", "run one node's worker here (no MPI): instance, handlers, broker");
  auto o = std::make_shared<WorkerOpts>();
  w->add_option("--sif", o->sif,
                "the runtime image (default: <sif_path>/<runtime>.sif; not needed with the host engine)")
      ->type_name("PATH");
  w->add_option("--mode", o->mode, "dispatch (default) or runscript (deploy.mode)")
      ->check(choice(config::k_mode_names))
      ->type_name("MODE");
  w->add_option("--runtime", o->runtime,
                "the Lithops runtime this worker serves, and the image <sif_path>/NAME.sif when no --sif is given "
                "(singularity.runtime; default: the image's name without .sif)")
      ->check(choice(config::runtime_name_error))
      ->type_name("NAME");
  w->add_option("--slots", o->slots,
                "tasks at once (default: singularity.worker_processes, else the cores; a GPU runtime: its GPU slots, "
                "which this may lower)")
      ->type_name("N");
  w->add_option("--engine", o->engine, "singularity, apptainer or host (singularity.engine)")
      ->check(choice(config::k_engine_names))
      ->type_name("ENGINE");
  add_gpu_flags(w, o->gpu);
  actions.push_back({w, [&g, o] { return run_worker(g, *o); }});
}

}  // namespace lhpc::cli
