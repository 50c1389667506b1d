// Every deployment of this user at a glance, plus the autoalloc controller's
// line: what `lithops-hpc status` shows without a job id and what
// `lithops-hpc stop --all` acts on. Lives beside the controller because the
// controller's state file is half of it.
#pragma once

#include <string>
#include <vector>

#include "health/status_file.h"
#include "health/view.h"

namespace lhpc::autoalloc {

struct Deployment {
  health::Found found;
  health::StatusView view;
  health::Assessment assessment;
};

// Every <state dir>/jobs/*/status.json of ours that parses, oldest first.
std::vector<Deployment> deployments(double now);

// One line per deployment (its headline) and the controller's line;
// `code`: 0 when every live deployment is healthy, 1 when any is not, 8
// when there is neither a deployment nor a controller.
std::string overview_text(double now, int& code);
// {"deployments": [status documents], "autoalloc": state or null}.
std::string overview_json(double now, int& code);

// Deployments still running (not stopped, failed or stale): `stop --all`.
std::vector<Deployment> live_deployments(double now);

}  // namespace lhpc::autoalloc
