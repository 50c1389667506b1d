// The Scheduler port (ports.h) on Slurm: the state of the controller's jobs
// (libslurm when built with it and reachable, squeue otherwise or to confirm
// that a job libslurm no longer knows has really left the queue), squeue by
// job name, sbatch and scancel. Every program runs from an explicit argv,
// never through a shell; the broker URL is never on a command line (the jobs
// read it from their configuration file or inherit AMQP_URL, as with a
// hand-made sbatch). sbatch's reply is read by sbatch_reply.h.
#pragma once

#include <string>
#include <vector>

#include "autoalloc/ports.h"

namespace lhpc::autoalloc {

// How every job is submitted, whatever the controller asks.
struct SlurmOptions {
  std::string script;                    // the sbatch template
  std::string time_limit = "1:00:00";    // sbatch --time
  std::vector<std::string> sbatch_args;  // passthrough (partition, account, qos ...)
  // How a GPU runtime's GPUs are asked for: --gpus-per-node=N or --gres=gpu:N.
  config::GpuRequest gpu_request = config::GpuRequest::gpus_per_node;
};

// The output file of job `id` submitted with output_dir `dir`.
std::string slurm_output(const std::string& dir, const std::string& id);

// The exact argv sbatch runs with (pure: tested as data).
std::vector<std::string> sbatch_argv(const SlurmOptions& o, const Submission& s);

class SlurmScheduler final : public Scheduler {
public:
  explicit SlurmScheduler(SlurmOptions o) : m_o(std::move(o)) {}
  std::optional<std::map<std::string, SeenJob>> query(const std::vector<std::string>& ids) override;
  std::vector<std::string> jobs_named(const std::string& name) override;
  Submitted submit(const Submission& s) override;
  void cancel(const std::string& id) override;
  SchedulerCounters counters() const override { return m_counters; }

private:
  std::optional<std::map<std::string, SeenJob>> squeue_jobs();

  SlurmOptions m_o;
  SchedulerCounters m_counters;
};

}  // namespace lhpc::autoalloc
