#include "autoalloc/status_probe.h"

#include <spdlog/spdlog.h>

#include "health/status_file.h"
#include "health/view.h"
#include "util/error.h"

namespace lhpc::autoalloc {

DeploymentLook StatusProbe::look(const std::string& job) {
  DeploymentLook d;
  auto found = health::find_deployment(job);
  if (!found.found) {
    return d;
  }
  health::StatusView v;
  try {
    v = health::parse_status(found.found->text, found.found->loc.link);
  } catch (const Error& e) {
    spdlog::debug("job {}: {}", job, e.what());
    d.seen = DeploymentLook::Seen::unreadable;
    return d;
  }
  d.seen = DeploymentLook::Seen::report;
  for (const auto& rank : v.ranks) {
    if (rank.state == health::State::ready) {
      ++d.ready_ranks;
      d.slots_total += rank.slots_total;
    }
    d.slots_busy += rank.slots_busy;
  }
  d.winding_down = v.state != health::DeploymentState::running;
  d.done = v.summary.done;
  return d;
}

void StatusProbe::request_stop(const std::string& job) { health::request_stop(health::locate(job)); }

}  // namespace lhpc::autoalloc
