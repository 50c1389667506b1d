// `lithops-hpc up [options] [-- SBATCH_ARGS...]` and `lithops-hpc down
// [--keep-data]`: the user's services (broker, store, controller) and their
// settings in the Lithops config (services/up.h). Exit 0: running (up) or
// stopped (down).
#include <unistd.h>

#include <iostream>
#include <memory>

#include <spdlog/spdlog.h>

#include "cli/cli.h"
#include "config/config.h"
#include "services/up.h"
#include "util/error.h"

namespace lhpc::cli {

namespace {

struct UpArgs {
  services::UpOptions o;
  std::string runtime;
  long storage_memory_mib = 0;
};

Exit run_up(const Globals& g, UpArgs a) {
  if (!a.o.sif.empty() && !a.runtime.empty()) {
    throw Error(Exit::usage, "--sif and --runtime both name the image", "give one of them");
  }
  if ((a.o.tls_cert.empty()) != (a.o.tls_key.empty())) {
    throw Error(Exit::usage, "TLS needs both --tls-cert and --tls-key", "give both, or neither");
  }
  if (a.storage_memory_mib < 0) {
    throw Error(Exit::usage, "--storage-memory takes MiB above 0", "e.g. --storage-memory 2048");
  }
  if (!a.runtime.empty()) {
    auto cfg = load_config(g);
    cfg.singularity.runtime = a.runtime;
    a.o.sif = config::image_path(cfg);
  }
  a.o.storage_memory = static_cast<std::uint64_t>(a.storage_memory_mib) * 1024 * 1024;
  a.o.self = self_exe();
  a.o.config_path = g.config_path;
  std::cout << services::up(a.o);
  return Exit::ok;
}

}  // namespace

void register_up(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto a = std::make_shared<UpArgs>();
  auto* c = parent.add_subcommand(
      "up",
      "start your broker, a Redis for Lithops' storage and (with an image) the autoalloc controller, and write "
      "their settings into your Lithops config");
  c->add_option("--sif", a->o.sif, "image the controller's deployments serve: starts the controller")
      ->type_name("PATH");
  c->add_option("--runtime", a->runtime, "the same as --sif <sif_path>/NAME.sif")->type_name("NAME");
  c->add_option("--max-nodes", a->o.max_nodes, "the controller's --max-nodes")->type_name("N");
  c->add_option("--data-dir", a->o.data_dir,
                "where the broker's and the store's data live (default: the state directory; a local disk when "
                "home is on NFS)")
      ->type_name("DIR");
  c->add_option("--broker-url", a->o.broker_url,
                "use your site's broker instead of starting one (a URL without password, or - to read it from stdin)")
      ->type_name("URL|-");
  c->add_option("--storage", a->o.storage,
                "redis (default: start one), or the name of a Lithops storage your Lithops config sets up")
      ->type_name("NAME");
  c->add_option("--storage-memory", a->storage_memory_mib,
                "the store's maxmemory in MiB (default: a quarter of memory, 256 MiB to 8 GiB)")
      ->type_name("MIB");
  c->add_option("--bind", a->o.bind, "listen on ADDR instead of loopback (plain text: trusted networks only)")
      ->type_name("ADDR");
  c->add_option("--tls-cert", a->o.tls_cert, "the broker's TLS certificate (PEM): amqps on every interface")
      ->type_name("FILE");
  c->add_option("--tls-key", a->o.tls_key, "the broker's TLS key (PEM)")->type_name("FILE");
  c->add_option("--tls-ca", a->o.tls_ca, "the CA of --tls-cert (PEM)")->type_name("FILE");
  c->add_flag("--local", a->o.local,
              "the controller starts deployments on this machine with mpirun, no Slurm (autoalloc --local)");
  c->add_flag("--takeover", a->o.takeover, "start here although the record says they run on another host (it is gone)");
  c->add_option("SBATCH_ARGS", a->o.sbatch_args,
                "after --: the controller's sbatch arguments (with --local: mpirun's)");
  actions.push_back({c, [&g, a] { return run_up(g, *a); }});

  auto keep = std::make_shared<bool>(false);
  auto* d = parent.add_subcommand("down", "stop the deployments, the controller, the store and the broker of up");
  d->add_flag("--keep-data", *keep, "keep the queued messages and the stored objects for the next up");
  actions.push_back({d, [keep] {
                       std::cout << services::down(*keep, [] {
                         try {
                           stop_all_deployments(120);
                         } catch (const Error& e) {
                           if (e.code() != Exit::no_deployment) {
                             // down goes on to stop the rest, as it did
                             spdlog::warn("{}", e.what());
                           }
                         }
                       });
                       return Exit::ok;
                     }});
}

}  // namespace lhpc::cli
