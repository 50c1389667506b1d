// The Scheduler port (ports.h) on this machine, for `autoalloc --local` and
// `up --local`: no Slurm. A submission starts `mpirun -n N lithops-hpc deploy
// --sif IMAGE --transfer none` in a session (so a process group) of its own,
// detached, its output in a file of the directory it is given; the job id is
// made up here. What a restarted controller needs to find its jobs again is
// one record file per job (id, name, process group, the leader's start time)
// in a private directory of the user (util/fs's trust rules): `jobs_named`
// reads them. A job is alive while its process group is; a group id reused
// by another process after ours ended is told apart by the leader's start
// time. cancel is SIGTERM to the group: mpirun forwards it to the ranks
// (Open MPI 4.1 puts each rank in a process group of its own), which drain
// as on scancel.
// The deployment itself (status file, stop request) is the same as under
// Slurm (status_probe.*).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "autoalloc/ports.h"
#include "util/process.h"

namespace lhpc::autoalloc {

struct LocalOptions {
  std::string self;                        // this executable: `deploy` is run with it
  std::string records;                     // the private directory of the record files
  std::string mpirun = "mpirun";           // looked up in PATH
  std::vector<std::string> launcher_args;  // passthrough to mpirun (after --)
};

// What is kept of one local job (its record file, <records>/<id>.json).
struct LocalRecord {
  std::string id;
  std::string name;               // Submission::job_name
  long pgid = 0;                  // the session and process group; its leader is mpirun
  std::uint64_t start_ticks = 0;  // the leader's start time (/proc/<pid>/stat field 22)
  int nodes = 1;
  std::string output;
};

std::string to_json(const LocalRecord& r);
// nullopt when `text` is not a record (a warning names `source`): one
// unreadable file never stops the others from being found.
std::optional<LocalRecord> local_record_from_json(const std::string& text, const std::string& source);

// The fields of /proc/<pid>/stat the liveness check needs.
struct ProcStat {
  char state = '?';
  long pgrp = 0;
  std::uint64_t start_ticks = 0;
};
// Reads the text of /proc/<pid>/stat (the command name may hold spaces and
// parentheses: the fields start after the last ')'); nullopt when malformed.
std::optional<ProcStat> parse_proc_stat(const std::string& text);

// Is the recorded group still ours and alive? `signalable`: kill(-pgid, 0)
// succeeded; `leader`: /proc/<pgid>/stat when it exists. A pid is not handed
// out while a group carries its number, so a leader with another start time
// means ours ended and the number was reused; no leader but a signalable
// group means the leader ended and other members of its group still run.
bool group_alive(const LocalRecord& r, bool signalable, const std::optional<ProcStat>& leader);

// A plain name ([0-9A-Za-z._-]) unique on this machine: local-<unix s>-<pid>-<n>.
std::string local_job_id(long unix_seconds, long pid, unsigned long n);
std::string local_output(const std::string& dir, const std::string& id);
// The exact argv the deployment starts with (pure: tested as data).
std::vector<std::string> local_argv(const LocalOptions& o, const Submission& s);

class LocalScheduler final : public Scheduler {
public:
  explicit LocalScheduler(LocalOptions o);
  // The deployments keep serving after the controller ends (as Slurm jobs
  // do): their handles are released, never killed.
  ~LocalScheduler() override;
  LocalScheduler(const LocalScheduler&) = delete;
  LocalScheduler& operator=(const LocalScheduler&) = delete;

  std::optional<std::map<std::string, SeenJob>> query(const std::vector<std::string>& ids) override;
  std::vector<std::string> jobs_named(const std::string& name) override;
  Submitted submit(const Submission& s) override;
  void cancel(const std::string& id) override;
  SchedulerCounters counters() const override { return m_counters; }

private:
  std::optional<LocalRecord> record_of(const std::string& id);
  bool alive(const LocalRecord& r);
  void forget(const std::string& id);
  void reap();

  LocalOptions m_o;
  SchedulerCounters m_counters;
  std::map<std::string, Child> m_children;  // the ones this controller started: reaped here
  unsigned long m_made = 0;
};

}  // namespace lhpc::autoalloc
