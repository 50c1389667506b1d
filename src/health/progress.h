// Rank 0's periodic one-line progress summary for the job output, built from
// the health table it already keeps: tasks done and failed, how many finish
// per second, slots busy, ranks ready. One line, no terminal tricks, so a
// Slurm output file stays readable and greppable ("progress:").
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "health/table.h"

namespace lhpc::health {

// "progress: tasks 1234 done, 2 failed, 3.2/s; slots 12/16 busy; ranks 3/3 ready"
// `per_second`: tasks (done or failed) finished per second since the last line.
// `runtime`: the Lithops runtime served, appended as "; runtime NAME" (empty: "every runtime").
std::string progress_line(const Summary& s, double per_second, const std::string& runtime = {});

class Progress {
public:
  // `interval` seconds between lines (logs.progress_interval); 0: never.
  // `start`: the time (any monotonic seconds) the count starts from.
  Progress(double interval, double start, std::string runtime = {})
      : m_interval(interval), m_last_at(start), m_runtime(std::move(runtime)) {}

  // The line when one is due at `now`, else nothing.
  std::optional<std::string> due(const Summary& s, double now);

private:
  double m_interval;
  double m_last_at;
  unsigned long long m_last_finished = 0;
  std::string m_runtime;
};

}  // namespace lhpc::health
