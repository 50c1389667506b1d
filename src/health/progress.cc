#include "health/progress.h"

#include <fmt/format.h>

namespace lhpc::health {

std::string progress_line(const Summary& s, double per_second, const std::string& runtime) {
  std::string line =
      fmt::format("progress: tasks {} done, {} failed, {:.1f}/s; slots {}/{} busy; ranks {}/{} ready", s.done, s.failed,
                  per_second < 0 ? 0.0 : per_second, s.slots_busy, s.slots_total, s.ready, s.ranks);
  if (s.unresponsive > 0) {
    line += fmt::format(", {} unresponsive", s.unresponsive);
  }
  line += runtime.empty() ? "; every runtime" : "; runtime " + runtime;
  return line;
}

std::optional<std::string> Progress::due(const Summary& s, double now) {
  if (m_interval <= 0 || now - m_last_at < m_interval) {
    return std::nullopt;
  }
  unsigned long long finished = s.done + s.failed;
  // Counters of a rank that restarted can go down: never a negative rate.
  double delta = finished >= m_last_finished ? static_cast<double>(finished - m_last_finished) : 0.0;
  double rate = delta / (now - m_last_at);
  m_last_at = now;
  m_last_finished = finished;
  return progress_line(s, rate, m_runtime);
}

}  // namespace lhpc::health
