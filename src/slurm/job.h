// Slurm facts a deployment needs: are we in an allocation, which job, which
// nodes, how long until the time limit, and what Slurm says about a job.
// libslurm is optional at build time (LHPC_HAVE_SLURM): without it the same
// calls answer from the SLURM_* environment of the job step, and what only
// the controller knows (time left, another job's state) is std::nullopt.
// Nothing here ever throws or exits because Slurm is absent, misconfigured or
// unreachable: failures are logged at debug level and read as "unknown".
// Named job.h, not slurm.h: src/ is on the include path and a src/slurm/slurm.h
// would hide libslurm's own <slurm/slurm.h>.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace lhpc::slurm {

// Built with libslurm.
bool built_with_libslurm() noexcept;
// libslurm is built in and initialised (a Slurm configuration was found and
// parses). The first call decides, once per process, and may take up to a
// few seconds: call it early (e.g. before MPI_Init) to keep that off the
// event loop. Later calls are free.
bool libslurm_available();

// $SLURM_JOB_ID is set: this process runs inside a Slurm job.
bool in_allocation();
// $SLURM_JOB_ID (or the older $SLURM_JOBID).
std::optional<std::string> job_id();
// The job's nodes, expanded in Slurm's order, from $SLURM_JOB_NODELIST (or
// $SLURM_NODELIST): libslurm's hostlist when built with it, else
// expand_hostlist(). Empty outside an allocation or when the list is malformed.
std::vector<std::string> node_list();

// Seconds until the job (default: this one) reaches its time limit, from the
// controller (slurm_get_rem_time, clamped at 0). nullopt without libslurm,
// outside an allocation, when the job has no limit (INFINITE), or when the
// controller cannot be asked.
std::optional<double> seconds_left(const std::string& jobid = {});

// seconds_left() asks the controller and may block for its MessageTimeout
// when slurmctld is slow or down. An event loop uses this instead: a thread
// of its own asks every `period` (the first time at once), and current()
// counts down from the last answer without blocking.
class TimeLeftWatch {
public:
  explicit TimeLeftWatch(std::string jobid = {}, std::chrono::milliseconds period = std::chrono::seconds(30));
  ~TimeLeftWatch();  // stops the thread (waits for a call in flight)
  TimeLeftWatch(const TimeLeftWatch&) = delete;
  TimeLeftWatch& operator=(const TimeLeftWatch&) = delete;

  // Seconds left now; nullopt until the first answer, and when there is no
  // limit, no libslurm, or no job.
  std::optional<double> current() const;
  // The first answer has come back (whatever it was).
  bool asked() const;

private:
  struct State;
  std::shared_ptr<State> m_state;
  std::thread m_thread;
};

struct JobInfo {
  std::string job_id;
  std::string name;
  // As squeue/scontrol print it: PENDING RUNNING SUSPENDED COMPLETING
  // CONFIGURING COMPLETED CANCELLED FAILED TIMEOUT NODE_FAIL PREEMPTED
  // BOOT_FAIL DEADLINE OUT_OF_MEMORY; empty when unknown.
  std::string state;
  std::string reason;  // Slurm's state description, if any
  std::string user;    // name, or the uid as text
  std::string partition;
  std::string nodes;                   // ranged form, "n[1-3]"
  std::vector<std::string> node_list;  // expanded
  std::uint32_t num_nodes = 0;
  std::optional<double> time_limit;        // seconds; nullopt: no limit (or unknown)
  std::optional<std::int64_t> start_time;  // unix seconds, actual or expected
  std::optional<std::int64_t> end_time;    // unix seconds, actual or expected
  std::string batch_host;
  std::string std_out;  // path of the batch script's output
  std::string work_dir;
  std::optional<int> exit_code;   // when the job has ended
  bool from_environment = false;  // filled from SLURM_* variables, not the controller

  // Still holding (or waiting for) its nodes.
  bool active() const;
};

// What the controller knows about `jobid` (numeric; an empty id means this
// job). Without libslurm, or when the controller cannot be asked, the current
// job's entry is filled from the environment (state "RUNNING", since we run
// inside it) and any other job is nullopt. A job the controller has
// forgotten (MinJobAge) is nullopt.
std::optional<JobInfo> job_info(const std::string& jobid = {});

// Slurm hostlist syntax, without libslurm: "n1", "n[1-3,5]", "n[01-10]"
// (zero padding kept), "rack[1-2]-n[1-2]" (brackets multiply), comma or
// whitespace separated items. nullopt for a malformed list (unbalanced
// bracket, empty or reversed range, non-digits in a range, more than
// 1,048,576 names).
std::optional<std::vector<std::string>> expand_hostlist(std::string_view list);
// The inverse for display: consecutive names sharing a prefix are merged,
// "n1,n2,n3,n5" -> "n[1-3,5]", "gpu01,gpu02" -> "gpu[01-02]". Order is kept.
std::string compress_hostlist(const std::vector<std::string>& hosts);

}  // namespace lhpc::slurm
