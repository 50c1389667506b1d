// Every deployment of this user at a glance, plus the autoalloc controller's
// line: what `lithops-hpc status` shows without a job id and what
// `lithops-hpc stop --all` acts on. Lives beside the controller because the
// controller's state file is half of it.
#pragma once

#include <string>
#include <vector>

#include "health/status_file.h"
#include "health/view.h"
#include "util/error.h"

namespace lhpc::autoalloc {

struct Deployment {
  health::Found found;
  health::StatusView view;
  health::Assessment assessment;
};

// Every <state dir>/jobs/*/status.json of ours that parses, oldest first.
std::vector<Deployment> deployments(double now);

// What `status` prints without a job id, and how it ends: ok when every live
// deployment is healthy, failure when one is not (or the controller reports
// an error), no_deployment when there is neither a deployment nor a controller.
struct Overview {
  std::string text;
  Exit code = Exit::ok;
};
// Ended deployments are shown for this long after their last update, or
// always with `status --all` (`all`); older ones are counted in a last line.
constexpr double k_recent_seconds = 3600;
// One line per deployment shown (its headline) and the controller's line.
Overview overview_text(double now, bool all = false);
// {"deployments": [status documents shown], "hidden": N, "autoalloc": state or null}.
Overview overview_json(double now, bool all = false);

// Deployments still running (not stopped, failed or stale): `stop --all`.
std::vector<Deployment> live_deployments(double now);

}  // namespace lhpc::autoalloc
