// The controller's ports (ports.h) for `autoalloc --local` and `up --local`:
// the local scheduler (local_scheduler.*: mpirun on this machine), and the
// same broker probe, status files and clock as slurm_ports.*.
#pragma once

#include <string>

#include "autoalloc/controller.h"

namespace lhpc::autoalloc {

// `self`: this executable (the deployments run `self deploy`); Settings'
// sbatch_args go to mpirun instead. Records in <controller dir>/local.
Ports local_ports(const Settings& s, const std::string& self);

}  // namespace lhpc::autoalloc
