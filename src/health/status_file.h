// Where a deployment's status file and stop request live, and how `status`
// and `stop` find them. Every deployment has a job directory
// <state_dir()>/jobs/<jobid>/ (0700) holding:
//   status.json  the status (mode 0600, replaced atomically), or a symlink to
//                health.status_file when the configuration names one
//   stop         a stop request written by `lithops-hpc stop` (0600)
// On a cluster, state_dir() is in the shared home, so `status` on a login
// node reads what rank 0 writes on a compute node.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace lhpc::health {

struct Location {
  std::string job;
  std::string dir;     // <state_dir()>/jobs/<job>
  std::string status;  // the file rank 0 writes: health.status_file or <dir>/status.json
  std::string link;    // <dir>/status.json: what `status` reads (== status by default)
  std::string stop;    // <dir>/stop
};

// Throws Error(usage) for a job id that is not a plain name ([A-Za-z0-9._+-],
// not "." or ".."): it becomes a directory name.
void check_job_id(const std::string& job);

// `configured`: health.status_file with placeholders already expanded; empty: default.
Location locate(const std::string& job, const std::string& configured = {});

// Rank 0 at start: creates the job directory (0700; the state dir 0700 when
// made here), removes a stop request left over from an earlier run with the
// same job id (e.g. "local"), and points <dir>/status.json at a configured
// status file (its missing directories made under trusted ones). Throws
// Error naming the path.
void prepare(const Location& loc);
// Atomic replacement, mode 0600, in a directory that passes util/fs's trust
// rules (every parent root's or yours, a link on the way root's or yours);
// throws Error naming the directory and its owner otherwise.
void write_status(const Location& loc, const std::string& json);

// Rank 0, each interval: a cheap stat().
bool stop_requested(const Location& loc);
// `lithops-hpc stop`: writes <dir>/stop (0600) saying who asked and when.
void request_stop(const Location& loc);
void clear_stop(const Location& loc);

// The job id `status`/`stop` mean without one on the command line:
// $SLURM_JOB_ID, else $LITHOPS_HPC_JOB_ID, else none (then: the newest).
std::optional<std::string> job_from_environment();

struct Found {
  Location loc;
  std::string text;  // the status file's content
};
struct Lookup {
  std::optional<Found> found;
  std::string looked;  // where we looked, for the "no deployment found" message
};
// `job` empty: the environment's job, else the deployment with the newest
// "updated" among this user's <state_dir()>/jobs/*/status.json. A status
// file is read only as util/fs's read_trusted_file allows (a regular file of
// yours, through directories and links only you or root control): for the
// job asked for, anything else is an Error saying why; in the search for the
// newest it is passed over.
Lookup find_deployment(const std::string& job);

// Where each entry of <state_dir()>/jobs named like a job id would keep its
// files (nothing is read); other names are passed over.
std::vector<Location> job_locations();

// Removes the directory under <state_dir()>/jobs of every deployment that
// ended (stopped, failed, or stale: no update for long) more than
// `keep_seconds` before `now` (its status file's "updated"), except `keep_job`'s:
// its status, stop request and the logs kept there. A status file kept
// elsewhere (health.status_file) is left; so is a directory without a
// readable status. Returns how many were removed (each logged).
int prune_ended(double now, double keep_seconds, const std::string& keep_job);

}  // namespace lhpc::health
