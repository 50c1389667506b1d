// `lithops-hpc deploy`: the per-rank lifecycle that ties the concerns together.
//   init MPI -> load config -> agree on job id, node, slots -> stage image
//   -> start instance and worker -> ready -> event loop (worker, health, signals,
//   stop requests, Slurm time left) -> drain -> stop instance -> cleanup -> finalize
#pragma once

#include <optional>
#include <string>

#include "config/config.h"
#include "util/error.h"

namespace lhpc::deploy {

struct Options {
  std::string sif;                           // --sif; may be empty with the host engine
  std::optional<config::Transfer> transfer;  // --transfer overrides deploy.transfer
  std::optional<config::Mode> mode;          // --mode overrides deploy.mode
  std::optional<config::Engine> engine;      // --engine overrides singularity.engine
  std::optional<int> slots;                  // --slots: per node, overrides worker_processes
  std::optional<std::string> sif_path;       // --sif-path overrides singularity.sif_path
  std::optional<std::string> status_file;    // --status-file overrides health.status_file
  std::optional<double> interval;            // --interval overrides health.interval
  std::optional<std::string> logs_dir;       // --logs-dir overrides logs.dir
  bool cleanup = false;                      // --cleanup (or deploy.cleanup)
};

// Runs the whole deployment on this rank; returns how it ended (main.cc
// makes the number), or ends the job through MpiSession::abort.
Exit run(const config::Config& cfg, const Options& opts);

// Slots of one rank: the node's slots split among the ranks on that node,
// the first `total % ranks` ranks taking one more; never below one.
int slots_for_rank(int node_slots, int ranks_on_node, int index_on_node);

}  // namespace lhpc::deploy
