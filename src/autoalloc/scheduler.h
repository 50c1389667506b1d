// What the autoalloc controller asks of Slurm, and nothing else: the state of
// its jobs (libslurm when built with it and reachable, squeue otherwise or to
// confirm that a job libslurm no longer knows has really left the queue),
// sbatch and scancel. Every program runs from an explicit argv, never through
// a shell; the broker URL is never on a command line (the jobs read it from
// their configuration file or inherit AMQP_URL, as with a hand-made sbatch).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace lhpc::autoalloc {

struct SeenJob {
  bool pending = false;
  bool ended = false;  // in a final state, or gone from the queue
  int nodes = 0;
  std::optional<double> seconds_left;  // running with a limit
};

// nullopt: Slurm could not be asked (then nothing is known, not "ended").
// `queries` counts the scheduler calls made (for the benchmark).
std::optional<std::map<std::string, SeenJob>> query_jobs(const std::vector<std::string>& ids,
                                                         unsigned long long& queries);

// Ids of this user's active jobs with that name (squeue); empty when unknown.
std::vector<std::string> jobs_named(const std::string& name);

struct SubmitRequest {
  std::string script;
  std::string sif;
  int nodes = 1;
  std::string time_limit;
  std::string job_name;
  std::string output;  // sbatch --output pattern
  std::vector<std::string> sbatch_args;
  std::string config_path;  // exported as LITHOPS_HPC_CONFIG when set
};

// The exact argv sbatch runs with (pure: tested as data).
std::vector<std::string> sbatch_argv(const SubmitRequest& r);

struct SubmitResult {
  std::optional<std::string> job;
  std::string message;  // sbatch's stderr (refusal) or its stdout
};
SubmitResult sbatch(const SubmitRequest& r);

// scancel; failures are logged (the job may have ended meanwhile).
void cancel_job(const std::string& id);

}  // namespace lhpc::autoalloc
