// The sbcast transfer of stage: rank 0 runs Slurm's sbcast, which writes one
// path on every node of the allocation; every leader then hashes its copy.
// What sbcast needs of the job is checked before anything moves.
#pragma once

#include <string>
#include <vector>

#include "stage/stage.h"
#include "util/mpi.h"
#include "util/process.h"

namespace lhpc::stage {

// Rank 0, before reading the source: an allocation and sbcast in PATH.
// Throws Error(usage).
void check_sbcast_usable();

// Rank 0, once every leader named its private directory: one path on every
// node (no %n in sif_path) and a rank on every node of the allocation.
// Throws Error(usage).
void check_sbcast_layout(const std::vector<std::string>& node_names, const std::vector<std::string>& node_dirs);

// Rank 0: sbcast o.source to `dest` on every node; a signal stops it.
Outcome run_sbcast(const Options& o, const std::string& dest);

// sbcast's environment: ours without what it has no use for and must not
// see (the broker URL and its password).
Env sbcast_env(Env ours);

}  // namespace lhpc::stage
