// Reading a status file for people and scripts: parse it, judge it (the exit
// code of `lithops-hpc status`), and draw the table. States are parsed into
// the enums the writer uses (health/report.h, health/table.h): nothing past
// parse_status compares a state as text.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "health/table.h"
#include "util/error.h"

namespace lhpc::health {

struct RankView {
  int rank = 0;
  std::string node;
  long pid = 0;
  State state = State::starting;
  int slots_busy = 0;
  int slots_total = 0;
  unsigned long long done = 0, failed = 0, requeued = 0, dead_lettered = 0;
  bool broker = false;
  bool consuming = true;  // absent in older status files
  bool blocked = false;
  unsigned long long duplicates = 0;
  bool instance = false;
  unsigned restarts = 0;
  unsigned long long rss_kb = 0, rss_tree_kb = 0;
  std::optional<double> last_seen;
  std::string last_error;
  std::vector<std::vector<std::string>> gpus;  // a GPU runtime: slot k's devices
  std::vector<int> gpus_out;                   // slots out of service (indices into gpus)
  std::string gpus_out_why;                    // "slot 2: why; slot 3: why"
  struct GpuMemory {
    std::string gpu;  // a device id of `gpus`
    unsigned long long used_mib = 0, total_mib = 0;
  };
  std::vector<GpuMemory> gpu_memory;  // where nvidia-smi gave figures
};

struct StatusView {
  std::string job;
  std::string runtime;  // empty: every runtime (or a status file written before runtimes)
  int version = 0;
  double updated = 0;
  double started = 0;
  double interval = 0;
  std::string rank0_host;
  long rank0_pid = 0;
  DeploymentState state = DeploymentState::running;
  Summary summary;
  std::vector<RankView> ranks;
};

// Throws Error(failure) naming `source` and the first key that is missing, of
// the wrong type, or a state this version does not know.
StatusView parse_status(const std::string& text, const std::string& source);

struct Assessment {
  Exit code = Exit::ok;  // ok: running and every rank ready; failure: anything else
  bool stale = false;    // rank 0 stopped updating the file (3 intervals) before the end
  double age = 0;        // seconds since "updated"
  std::string headline;  // one line saying how the deployment is, for people
};
Assessment assess(const StatusView& s, double now_unix);

// The table (rank, node, state, slots, done/failed/requeued, broker,
// instance, restarts, RSS, last seen), last errors, and the summary line.
std::string render(const StatusView& s, const Assessment& a);

}  // namespace lhpc::health
