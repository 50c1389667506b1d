// Rank 0's view of the deployment: the latest report of every rank and when
// it arrived, ranks silent for 3 intervals marked unresponsive, every state
// change logged, and the status JSON (the contract `lithops-hpc status` and
// scripts read; described key by key in man/lithops-hpc.1).
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "health/report.h"

namespace lhpc::health {

// The deployment as a whole (the status file's top-level "state").
enum class DeploymentState { running, draining, stopped, failed };
inline constexpr Names<DeploymentState, 4> k_deployment_state_names{{{
    {DeploymentState::running, "running"},
    {DeploymentState::draining, "draining"},
    {DeploymentState::stopped, "stopped"},
    {DeploymentState::failed, "failed"},
}}};
// The deployment is over: stopped or failed (it serves no more and writes no more).
bool ended(DeploymentState s);

inline constexpr int k_status_version = 1;
inline constexpr double k_unresponsive_intervals = 3;

// Time sources, injectable for tests: `mono` orders events (last seen,
// aging), `wall` stamps the file (unix seconds).
struct Clock {
  std::function<double()> mono;
  std::function<double()> wall;
  static Clock system();
};

struct TableOptions {
  std::string job;
  std::string runtime;  // the Lithops runtime it serves; empty: every runtime
  int ranks = 1;
  double interval = 5;
  std::string rank0_host;
  long rank0_pid = 0;
  double started = 0;  // unix time the deployment started; 0: when the table is made
};

struct Summary {
  int ranks = 0;
  int ready = 0;
  int degraded = 0;  // staging, starting, draining, failed or stopped
  int unresponsive = 0;
  long long slots_busy = 0;
  long long slots_total = 0;
  unsigned long long done = 0;
  unsigned long long failed = 0;
  unsigned long long requeued = 0;
  unsigned long long dead_lettered = 0;
  unsigned long long duplicates = 0;
};

class Table {
public:
  enum class Level { info, warn };
  using LogFn = std::function<void(Level, const std::string&)>;

  struct Entry {
    std::optional<Report> report;   // latest; none before the first one arrived
    double last_seen = 0;           // mono time of the latest report (table creation before any)
    State shown = State::starting;  // what the status file says: reported state or unresponsive
  };

  explicit Table(TableOptions opts, Clock clock = Clock::system());

  // Log sink for state changes (default: spdlog at info/warn).
  void set_logger(LogFn fn) { m_log = std::move(fn); }

  // Takes in a report (rank 0's own, or one off the wire). A report older
  // than the latest of its rank (by seq) or for a rank out of range is
  // ignored: returns false.
  bool update(const Report& r);
  // Marks every rank silent for 3 intervals as unresponsive (except ranks
  // that reported stopped: they are done and silent on purpose). Call after
  // taking in the reports that arrived, before writing.
  void age();
  // True once after any state change (first report included): rank 0
  // rewrites the status file at once instead of at the next interval.
  bool take_changed();

  void set_state(DeploymentState s) { m_state = s; }
  DeploymentState state() const noexcept { return m_state; }
  const TableOptions& options() const noexcept { return m_opts; }
  const std::vector<Entry>& entries() const noexcept { return m_entries; }

  Summary summary() const;
  // Ranks whose latest reported state is not `s` (e.g. not yet stopped).
  std::vector<int> ranks_not_reporting(State s) const;
  // Label for logs: "rank 2 n3" (or "rank 2" before its first report).
  std::string label(int rank) const;

  // The status document at wall-clock now (compact JSON, one line).
  std::string to_json() const;

private:
  void change(int rank, State to, const std::string& why);

  TableOptions m_opts;
  Clock m_clock;
  double m_created_mono;
  double m_started_wall;
  DeploymentState m_state = DeploymentState::running;
  std::vector<Entry> m_entries;
  LogFn m_log;
  bool m_changed = false;
};

}  // namespace lhpc::health
