// The controller's ports (ports.h) as `lithops-hpc autoalloc` uses them:
// Slurm, the broker, the status files, the system clock. A local scheduler
// (`up --local`) gets a sibling of this file, not a change to the controller.
#pragma once

#include "autoalloc/controller.h"

namespace lhpc::autoalloc {

// Slurm with Settings' script, time limit and sbatch arguments; the broker
// with Settings' broker options and queue.
Ports slurm_ports(const Settings& s);

}  // namespace lhpc::autoalloc
