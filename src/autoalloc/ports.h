// What the autoalloc controller needs from the world, as three ports, so its
// loop is tested against fakes (tests/unit/test_autoalloc.cpp) and a second
// scheduler fits in without touching it:
//  - Scheduler: the jobs that hold deployments. Slurm (slurm_scheduler.*:
//    libslurm, squeue, sbatch, scancel) in production; a local one (mpirun
//    on this machine) can implement the same calls: a job id it makes up, a
//    process group it signals, an output file in the directory it is given.
//  - QueueProbe: the demand (ready messages, consumers) of the task queue
//    and of each runtime's queue (broker_probe.*: a passive declare; a
//    runtime queue is declared and bound first, as deployments do).
//  - DeploymentProbe: what a deployment reports about itself and how it is
//    asked to drain (status_probe.*: its status file and stop request under
//    the state directory, the same whichever scheduler started it).
//  - ClientStore: writes to a Lithops client's storage what no deployment
//    can answer (no_image.h; client_store.*: its redis).
// Counters of the calls each real implementation makes live there; the
// controller only copies them into its state file (the benchmark reads them).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"

namespace lhpc::autoalloc {

// One job as the scheduler sees it.
struct SeenJob {
  bool pending = false;
  bool ended = false;  // in a final state, or gone from the queue
  int nodes = 0;
  std::optional<double> seconds_left;  // running with a limit
};

// What the controller asks for; how (sbatch's template, --time, partition ...)
// is the implementation's own configuration.
struct Submission {
  std::string sif;  // the image the deployment serves
  int nodes = 1;
  // Every submission carries it: a controller restarted after a kill between
  // the submission and saving its state finds the job by it (jobs_named).
  std::string job_name;
  std::string output_dir;   // where the deployment's output file goes
  std::string config_path;  // LITHOPS_HPC_CONFIG of the deployment; empty: its own lookup
  std::string runtime;      // the Lithops runtime it serves (deploy --runtime); empty: the image's
  // A GPU runtime (gpus_per_slot > 0): each node is asked for gpu_slots
  // slots of gpus_per_slot GPUs (gpu::sbatch_request), and the deployment is
  // told it serves a GPU runtime.
  int gpus_per_slot = 0;
  int gpu_slots = 1;
  config::GpuVendor gpu_vendor = config::GpuVendor::nvidia;
};

struct Submitted {
  std::optional<std::string> job;  // a plain name ([0-9A-Za-z._-]): it becomes a directory name
  std::string output;              // job set: the deployment's output file
  std::string message;             // no job: the scheduler's refusal, bounded and redacted
  // No job, but the scheduler may have made one anyway (it said yes in a way
  // we could not read): the controller looks for it by name at once.
  bool maybe_submitted = false;
  // What the scheduler was asked, for the controller's log ("-N 2 --time=1:00:00";
  // "mpirun -n 2, no time limit"); empty: the controller says the node count.
  std::string request;
};

struct SchedulerCounters {
  unsigned long long submissions = 0;  // sbatch calls
  unsigned long long queries = 0;      // job state and job name queries, cancellations
};

class Scheduler {
public:
  virtual ~Scheduler() = default;
  // The state of these jobs; nullopt: the scheduler could not be asked (then
  // nothing is known, not "ended"). A job it no longer knows is `ended`.
  virtual std::optional<std::map<std::string, SeenJob>> query(const std::vector<std::string>& ids) = 0;
  // Ids of this user's active jobs with that name; empty when unknown (logged).
  virtual std::vector<std::string> jobs_named(const std::string& name) = 0;
  virtual Submitted submit(const Submission& s) = 0;
  // Failures are logged: the job may have ended meanwhile.
  virtual void cancel(const std::string& id) = 0;
  virtual SchedulerCounters counters() const = 0;
};

struct QueueLook {
  std::uint64_t ready = 0;  // messages ready
  int consumers = 0;
};

class QueueProbe {
public:
  virtual ~QueueProbe() = default;
  // nullopt: the broker could not be asked (logged). A queue that does not
  // exist yet is {0, 0}: nothing was published.
  virtual std::optional<QueueLook> look() = 0;
  // A runtime's queue (dispatch/runtime.h). It is declared (durable) and
  // bound to the runtimes' fanout exchange first, as its deployments do:
  // what other runtimes' deployments move there, get_metadata included,
  // waits in it before that runtime has a deployment. nullopt: not asked.
  virtual std::optional<QueueLook> look_runtime(const std::string& runtime) = 0;
  virtual unsigned long long queries() const = 0;

  // Messages the controller takes itself (no_image.h), one at a time
  // (basic.get), each settled before the next is taken.
  enum class Source {
    task_queue,
    // The controller's own queue bound to the runtimes' fanout exchange: a
    // copy of every get_metadata a deployment found not its own; and to
    // dispatch::wanted_exchange: deployments' notices of runtime queues
    // nothing consumes (Taken::wanted).
    copies,
    runtime_queue,  // <queue>.runtime.<runtime> (declared and bound first)
  };
  struct Taken {
    std::uint64_t tag = 0;
    std::string body;
    std::string wanted;  // a notice (dispatch::k_hdr_wanted_runtime): the runtime it names
  };
  // nullopt: the queue is empty, or the broker could not be asked (logged).
  virtual std::optional<Taken> take(Source from, const std::string& runtime) = 0;
  // Ack (`done`), or back to its queue.
  virtual void settle(Source from, std::uint64_t tag, bool done) = 0;
  // Publishes `body` to the runtime's queue (declared and bound first, as a
  // deployment moves it) and waits for the broker's confirm; false: not
  // confirmed (logged), the original is to be put back.
  virtual bool move(const std::string& runtime, const std::string& body) = 0;
};

class ClientStore {
public:
  virtual ~ClientStore() = default;
  // Writes each value at its key (as the client names it) in the storage
  // `storage` names (a Lithops storage configuration); the reason it could
  // not (never with a secret), or nullopt when all were written.
  virtual std::optional<std::string> put(const nlohmann::json& storage,
                                         const std::vector<std::pair<std::string, std::string>>& entries) = 0;
};

// What one deployment last reported.
struct DeploymentLook {
  enum class Seen {
    nothing,     // no report yet (staging, or gone)
    unreadable,  // a report that does not parse (being rewritten): keep what was known
    report,
  };
  Seen seen = Seen::nothing;
  bool winding_down = false;  // draining, stopped or failed
  int ready_ranks = 0;
  int slots_total = 0;  // over its ready ranks
  int slots_busy = 0;
  unsigned long long done = 0;  // tasks done, all ranks
};

class DeploymentProbe {
public:
  virtual ~DeploymentProbe() = default;
  virtual DeploymentLook look(const std::string& job) = 0;
  // Asks the deployment to drain and end (as `lithops-hpc stop` does).
  virtual void request_stop(const std::string& job) = 0;
};

}  // namespace lhpc::autoalloc
