// `lithops-hpc stage --sif PATH ...`: copy the runtime image to every node
// (an MPI program: launch with srun or mpirun, one rank per node), or with
// --cleanup remove what an earlier stage of this job put there.
#include <signal.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "stage/stage.h"
#include "util/error.h"
#include "util/log.h"
#include "util/mpi.h"
#include "util/signals.h"

namespace lhpc::cli {

namespace {

struct StageOpts {
  std::string sif;
  std::string transfer;
  std::string sif_path;
  int chunk_mib = 0;
  bool compress = false;
  bool cleanup = false;
  bool json = false;
};

Exit run_stage(const Globals& g, const StageOpts& so) {
  auto cfg = load_config(g);
  auto ph = config::current_placeholders();
  stage::Options o;
  o.source = so.sif;
  o.sif_dir = config::expand(so.sif_path.empty() ? cfg.singularity.sif_path : so.sif_path, ph);
  o.transfer = so.transfer.empty() ? cfg.deploy.transfer : config::k_transfer_names.parse(so.transfer).value();
  o.chunk_bytes = static_cast<std::size_t>(so.chunk_mib > 0 ? so.chunk_mib : cfg.deploy.chunk_mib) << 20;
  o.compress = so.compress || cfg.deploy.compress;
  o.jobid = ph.jobid;
  o.node_id = ph.node;
  o.stall_timeout = cfg.deploy.start_timeout;

  MpiSession mpi(nullptr, nullptr);
  SignalPipe signals{SIGINT, SIGTERM};
  if (mpi.size() > 1) {
    set_log_prefix("rank " + std::to_string(mpi.rank()) + " " + o.node_id);
  }
  o.progress = mpi.rank() == 0 && ::isatty(STDERR_FILENO) == 1;
  try {
    if (so.cleanup) {
      stage::cleanup(mpi.world(), o);
      return Exit::ok;
    }
    auto r = stage::stage_image(mpi.world(), o);
    if (mpi.rank() != 0) {
      return Exit::ok;
    }
    if (so.json) {
      nlohmann::json paths = nlohmann::json::object();
      for (std::size_t i = 0; i < r.node_names.size(); ++i) {
        paths[r.node_names[i]] = r.node_paths[i];
      }
      nlohmann::json j = {{"transfer", config::k_transfer_names.text(o.transfer)},
                          {"xxh3_128", r.hash_hex},
                          {"bytes", r.bytes},
                          {"seconds", r.seconds},
                          {"skipped", r.skipped},
                          {"nodes", r.nodes},
                          {"nodes_copied", r.nodes_copied},
                          {"paths", paths}};
      std::cout << j.dump(2) << "\n";
    } else {
      // One line per distinct path: usually one, one per node with %n.
      std::vector<std::string> seen;
      for (const auto& p : r.node_paths) {
        if (std::find(seen.begin(), seen.end(), p) == seen.end()) {
          seen.push_back(p);
          std::cout << p << "\n";
        }
      }
    }
    std::cout.flush();  // before MPI_Finalize, like the error path below
    return Exit::ok;
  } catch (const Error& e) {
    log_collective_error(mpi.rank(), e);
    return e.code();
  }
}

}  // namespace

void register_stage(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* st = parent.add_subcommand(
      "stage", "copy a SIF image to every node of the job (MPI program: one rank per node under srun or mpirun)");
  st->footer(
      "The copy goes to <sif_path>/lithops-hpc-<uid>-<jobid>/<name of the image> (mode 0700) on each node and is\n"
      "renamed into place only after its XXH3-128 hash matches the source's; a record beside it\n"
      "(<image>.stage.json) lets a later stage of the same image skip the copy. Prints the staged path (one line\n"
      "per distinct path). Exit status: 0 staged, 2 bad options, 4 the source is not a readable SIF image\n"
      "(nothing created), 7 a node failed (named; no partial file left), 130/143 interrupted by SIGINT/SIGTERM.");
  auto so = std::make_shared<StageOpts>();
  st->add_option("--sif", so->sif, "the SIF image to stage, as rank 0 sees it")->required()->type_name("PATH");
  st->add_option("--transfer", so->transfer,
                 "mpi: rank 0 reads the image once and broadcasts it to one rank per node (default, "
                 "[deploy] transfer); sbcast: Slurm's sbcast to every node of the allocation, then each node "
                 "checks the hash; none: the image is on a shared file system, only check it is readable there")
      ->check(choice(config::k_transfer_names))
      ->type_name("HOW");
  st->add_option("--sif-path", so->sif_path,
                 "node-local directory for staged images (default: singularity.sif_path, /tmp); %j job id, "
                 "%n node name, %u user are replaced")
      ->type_name("DIR");
  st->add_option("--chunk-mib", so->chunk_mib,
                 "size of each broadcast piece in MiB, 1-1024 (default: [deploy] chunk_mib, 8); two pieces are "
                 "held in memory per rank")
      ->check(CLI::Range(1, 1024))
      ->type_name("N");
  st->add_flag("--compress", so->compress, "with --transfer sbcast: pass --compress to sbcast");
  st->add_flag("--cleanup", so->cleanup,
               "remove this job's staged copy of the image (and its hash record) from every node instead of "
               "staging; the private directory goes too when nothing else is left in it");
  st->add_flag("--json", so->json,
               "print a JSON object instead of paths: transfer, xxh3_128, bytes, seconds, skipped, nodes, "
               "nodes_copied, paths (node name -> staged path)");
  actions.push_back({st, [&g, so] { return run_stage(g, *so); }});
}

}  // namespace lhpc::cli
