// `lithops-hpc autoalloc [options] [-- SBATCH_ARGS...]`: the foreground
// controller that submits, renews and retires Slurm deployments as the queue
// needs them (autoalloc/); with --local the same controller starts them on
// this machine with mpirun (local_ports.h). Flags override the [autoalloc]
// config section.
#include <filesystem>
#include <memory>

#include "autoalloc/controller.h"
#include "autoalloc/local_ports.h"
#include "autoalloc/slurm_ports.h"
#include "cli/cli.h"
#include "lhpc_build_config.h"
#include "lhpc_source_root.h"
#include "util/error.h"
#include "util/fs.h"

namespace lhpc::cli {

namespace {

struct AutoallocArgs {
  std::string sif, script, time_limit;
  int max_nodes = -1, nodes_per_job = -1, max_pending = -1, min_nodes = -1, max_start_failures = -1;
  double idle_timeout = -1, renew_before = -1, poll = -1;
  bool drain_on_exit = false;
  bool local = false;
  std::vector<std::string> sbatch_args;
  std::vector<std::string> runtimes;  // --runtime, repeatable
  std::string gpu_request;            // --gpu-request; empty: autoalloc.gpu_request
  GpuFlags gpu;
};

template <typename T>
void take(T& into, const T& flag, const T& unset) {
  if (flag != unset) {
    into = flag;
  }
}

std::string default_script() {
  for (const std::string& dir : {std::string(LHPC_DATADIR), std::string(LHPC_SOURCE_ROOT)}) {
    auto p = dir + "/slurm/lithops-deploy.sh";
    if (path_exists(p)) {
      return p;
    }
  }
  return std::string(LHPC_DATADIR) + "/slurm/lithops-deploy.sh";
}

std::string absolute(const std::string& p) { return std::filesystem::absolute(p).lexically_normal().string(); }

void check(const autoalloc::Settings& s, bool local) {
  const auto& l = s.limits;
  if (l.nodes_per_job > l.max_nodes) {
    throw Error(
        Exit::usage,
        "--nodes-per-job " + std::to_string(l.nodes_per_job) + " is above --max-nodes " + std::to_string(l.max_nodes),
        "raise --max-nodes or lower --nodes-per-job");
  }
  if (l.min_nodes > l.max_nodes) {
    throw Error(Exit::usage, "--min-nodes is above --max-nodes", "--min-nodes must fit within --max-nodes");
  }
  if (s.runtimes.empty() && s.sif.empty()) {
    throw Error(Exit::usage, "no image for the deployments",
                "give --sif PATH, autoalloc.sif in the configuration, set LITHOPS_SIF, or name the runtime "
                "(singularity.runtime in the Lithops config, or --runtime) so the image is <sif_path>/<runtime>.sif");
  }
  if (local) {
    return;  // no template, no time limit: a local deployment runs until it is stopped
  }
  auto limit = autoalloc::parse_slurm_time(s.time_limit);
  if (!limit || *limit <= 0) {
    throw Error(Exit::usage, "--time-limit '" + s.time_limit + "' is not a Slurm time",
                "use minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S (as sbatch --time)");
  }
  if (l.renew_before >= *limit) {
    throw Error(Exit::usage,
                "--renew-before " + std::to_string(static_cast<long>(l.renew_before)) +
                    " s is not below --time-limit " + s.time_limit,
                "a job would be renewed as soon as it serves: give a longer --time-limit or a shorter --renew-before");
  }
  if (!path_exists(s.script)) {
    throw Error(Exit::usage, "sbatch template " + s.script + " not found", "give it with --script PATH");
  }
}

// The runtimes served and their images: the first is the one an explicit
// image serves (--sif, autoalloc.sif, $LITHOPS_SIF) or singularity.runtime
// (as deploy finds it); then autoalloc.runtimes and --runtime, each
// <sif_path>/<runtime>.sif. Whether each image exists is the controller's
// question at every poll: one that appears later is served from then on.
std::vector<autoalloc::RuntimeImage> runtimes_from(const config::Config& cfg, const std::string& sif,
                                                   const std::vector<std::string>& more) {
  std::vector<autoalloc::RuntimeImage> out;
  auto add = [&](const std::string& runtime, const std::string& image) {
    for (const auto& r : out) {
      if (r.runtime == runtime) {
        return;
      }
    }
    out.push_back({runtime, image});
  };
  auto image_of = [&](const std::string& runtime) {
    auto c = cfg;
    c.singularity.runtime = runtime;
    return config::image_path(c);
  };
  if (!sif.empty()) {
    add(config::served_runtime(cfg, sif), sif);
  } else if (!cfg.singularity.runtime.empty()) {
    add(cfg.singularity.runtime, image_of(cfg.singularity.runtime));
  }
  for (const auto& r : more) {
    add(r, image_of(r));
  }
  if (out.size() == 1 && out[0].runtime.empty()) {
    out.clear();  // one image that names no runtime: Settings::sif alone, as before runtimes
  }
  return out;
}

autoalloc::Settings settings_from(const Globals& g, const config::Config& cfg, const AutoallocArgs& a) {
  auto c = cfg.autoalloc;
  take(c.sif, a.sif, std::string());
  take(c.script, a.script, std::string());
  take(c.time_limit, a.time_limit, std::string());
  take(c.max_nodes, a.max_nodes, -1);
  take(c.nodes_per_job, a.nodes_per_job, -1);
  take(c.max_pending, a.max_pending, -1);
  take(c.min_nodes, a.min_nodes, -1);
  take(c.max_start_failures, a.max_start_failures, -1);
  take(c.idle_timeout, a.idle_timeout, -1.0);
  take(c.renew_before, a.renew_before, -1.0);
  take(c.poll, a.poll, -1.0);
  c.runtimes.insert(c.runtimes.end(), a.runtimes.begin(), a.runtimes.end());
  if (c.sif.empty() && std::getenv("LITHOPS_SIF")) {
    c.sif = std::getenv("LITHOPS_SIF");
  }
  autoalloc::Settings s;
  s.limits = {c.max_nodes,    c.nodes_per_job, c.max_pending,       c.min_nodes,
              c.idle_timeout, c.renew_before,  c.max_start_failures};
  s.sif = c.sif.empty() ? c.sif : absolute(c.sif);
  s.runtimes = runtimes_from(cfg, s.sif, c.runtimes);
  s.script = c.script.empty() ? default_script() : absolute(c.script);
  s.time_limit = c.time_limit;
  s.poll = c.poll;
  s.drain_on_exit = a.drain_on_exit || c.drain_on_exit;
  s.sbatch_args = c.sbatch_args;
  s.sbatch_args.insert(s.sbatch_args.end(), a.sbatch_args.begin(), a.sbatch_args.end());
  if (auto path = config::find_config_file(g.config_path); path && path_exists(*path)) {
    s.config_path = absolute(*path);
  }
  s.queue = cfg.rabbitmq.queue;
  s.sif_path = config::expanded(cfg, config::current_placeholders()).singularity.sif_path;
  while (s.sif_path.size() > 1 && s.sif_path.back() == '/') {
    s.sif_path.pop_back();
  }
  s.broker = amqp::options_from(cfg.rabbitmq);
  s.broker.connection_name = "lithops-hpc autoalloc";
  s.default_slots = cfg.singularity.worker_processes > 0 ? cfg.singularity.worker_processes : 1;
  s.gpus_per_slot = cfg.singularity.gpus_per_slot;
  s.gpu_vendor = cfg.singularity.gpu_vendor;
  s.gpu_request = a.gpu_request.empty() ? c.gpu_request : config::k_gpu_request_names.parse(a.gpu_request).value();
  return s;
}

Exit run_autoalloc(const Globals& g, const AutoallocArgs& a) {
  auto cfg = load_config(g);
  apply_gpu_flags(a.gpu, cfg);
  config::require_amqp_url(cfg);
  auto s = settings_from(g, cfg, a);
  check(s, a.local);
  auto ports = a.local ? autoalloc::local_ports(s, self_exe()) : autoalloc::slurm_ports(s);
  autoalloc::Controller c(std::move(s), std::move(ports));
  return c.run();
}

void add_limits(CLI::App* c, AutoallocArgs& a) {
  c->add_option("--max-nodes", a.max_nodes, "nodes held at most, running and pending together (default 4)")
      ->type_name("N");
  c->add_option("--nodes-per-job", a.nodes_per_job, "nodes of each submitted job: sbatch -N (default 1)")
      ->type_name("K");
  c->add_option("--max-pending", a.max_pending, "jobs waiting in Slurm's queue at most (default 1)")->type_name("P");
  c->add_option("--min-nodes", a.min_nodes, "nodes kept even without work (default 0: scale to zero)")->type_name("M");
  c->add_option("--idle-timeout", a.idle_timeout, "seconds without a task before a deployment is stopped (default 300)")
      ->type_name("S");
  c->add_option("--max-start-failures", a.max_start_failures,
                "jobs failing at start in a row that stop submissions (default 3)")
      ->type_name("K");
}

}  // namespace

void register_autoalloc(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto a = std::make_shared<AutoallocArgs>();
  auto* c = parent.add_subcommand(
      "autoalloc", "submit, renew and retire Slurm deployments as the queue needs them (runs in the foreground)");
  c->add_option("--sif", a->sif,
                "image of the first runtime's deployments (autoalloc.sif, else $LITHOPS_SIF, else "
                "<sif_path>/<runtime>.sif of singularity.runtime)")
      ->type_name("PATH");
  c->add_option("--runtime", a->runtimes,
                "another runtime to serve, by <sif_path>/NAME.sif; repeatable (autoalloc.runtimes)")
      ->check(choice(config::runtime_name_error))
      ->type_name("NAME");
  c->add_option("--script", a->script, "sbatch template (default: the installed lithops-deploy.sh)")->type_name("PATH");
  add_limits(c, *a);
  c->add_option("--time-limit", a->time_limit, "sbatch --time of each job (default 1:00:00)")->type_name("SLURM_TIME");
  c->add_option("--renew-before", a->renew_before,
                "seconds before a job's time limit its successor is submitted while work remains (default 300)")
      ->type_name("S");
  c->add_option("--poll", a->poll,
                "seconds between looks at the queue and the jobs (default 10; at zero the queue every 0.5 s too)")
      ->type_name("S");
  c->add_flag("--drain-on-exit", a->drain_on_exit, "on SIGTERM or SIGINT stop the deployments too");
  c->add_flag("--local", a->local,
              "start the deployments on this machine with mpirun instead of Slurm (no template, no time limit)");
  add_gpu_flags(c, a->gpu);
  c->add_option("--gpu-request", a->gpu_request,
                "how a GPU runtime's GPUs are asked of Slurm: gpus-per-node (default: --gpus-per-node=N) or gres "
                "(--gres=gpu:N) (autoalloc.gpu_request)")
      ->check(choice(config::k_gpu_request_names))
      ->type_name("HOW");
  c->add_option("SBATCH_ARGS", a->sbatch_args,
                "after --: passed to sbatch (partition, account, qos ...); with --local to mpirun");
  actions.push_back({c, [&g, a] { return run_autoalloc(g, *a); }});
}

}  // namespace lhpc::cli
