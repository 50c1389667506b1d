// `lithops-hpc autoalloc`: the controller's loop. Each poll it asks its ports
// (ports.h) for demand (the queue: ready messages, consumers), for the state
// of the jobs it submitted (the scheduler) and for what those deployments
// report (ready ranks, busy slots), keeps the memory policy.h does not (idle
// clocks, start failures, backoff), hands the snapshot to decide(), and
// carries out the actions through the same ports: submit, ask to drain,
// cancel. Its state lives in <state dir>/autoalloc/state.json so a restarted
// controller adopts its jobs; the same file is what `lithops-hpc status`
// shows as the controller's line. Nothing here talks to Slurm or the broker.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "amqp/connection.h"
#include "autoalloc/no_image.h"
#include "autoalloc/policy.h"
#include "autoalloc/ports.h"
#include "util/error.h"
#include "util/fd.h"

namespace lhpc::autoalloc {

// A Lithops runtime the controller serves and the image its deployments run.
struct RuntimeImage {
  std::string runtime;  // empty: the image's own (one runtime, --sif)
  std::string sif;      // <sif_path>/<runtime>.sif, or --sif
  // This runtime's GPU settings (the flag or key, else its image's labels:
  // config/image_labels.h); nullopt: Settings' gpus_per_slot and gpu_vendor.
  std::optional<int> gpus_per_slot;
  std::optional<config::GpuVendor> gpu_vendor;
};

struct Settings {
  Limits limits;                       // --max-nodes and --max-pending shared by every runtime
  std::string sif;                     // the image when `runtimes` is empty: one runtime, the image's
  std::vector<RuntimeImage> runtimes;  // the first's demand includes the task queue's ready messages
  std::string script;                  // the sbatch template
  std::string time_limit = "1:00:00";  // sbatch --time
  double poll = 10;                    // seconds between looks
  bool drain_on_exit = false;
  std::vector<std::string> sbatch_args;  // passthrough (partition, account, qos ...)
  std::string config_path;               // handed to the jobs as LITHOPS_HPC_CONFIG; empty: their lookup
  std::string queue = "task_queue";
  std::string sif_path;  // where <runtime>.sif is looked for (singularity.sif_path, expanded); empty: nowhere
  amqp::Options broker;
  int default_slots = 1;  // slots per node assumed before a deployment reports (a GPU runtime: GPU slots)
  int gpus_per_slot = 0;  // > 0: a GPU runtime, each node asked for default_slots x this many GPUs
  config::GpuVendor gpu_vendor = config::GpuVendor::nvidia;
  config::GpuRequest gpu_request = config::GpuRequest::gpus_per_node;  // sbatch --gpus-per-node or --gres
};

// One job this controller submitted (or adopted), as kept across restarts.
struct JobRecord {
  std::string id;
  std::string runtime;  // the runtime it serves (Settings::runtimes); adopted by name: the first
  int nodes = 0;
  double submitted = 0;
  std::string out;     // the batch output file
  std::string renews;  // the job this one succeeds, if any
  Phase phase = Phase::pending;
  bool ever_serving = false;
  bool renewed = false;
  bool stop_requested = false;
  bool cancelled = false;
  int ready_ranks = 0, slots_total = 0, slots_busy = 0;
  std::optional<double> seconds_left;
  IdleClock idle;
};

// One runtime's demand as last seen: its queue plus, for the first runtime,
// what waits in the task queue; a runtime whose image is missing is never
// submitted, only reported (status line, state.json).
struct RuntimeDemand {
  std::string runtime;
  std::string sif;
  bool image = true;  // its file exists
  std::optional<std::uint64_t> ready;
  std::optional<int> consumers;  // of its queue, last look (not kept in state.json)
  double seen = 0;               // last time it had ready messages
};

struct State {
  std::vector<JobRecord> jobs;
  std::vector<RuntimeDemand> runtimes;
  int refused_in_row = 0;
  double backoff_until = 0;
  std::string last_refusal;      // sbatch's own message
  StartFailures start_failures;  // K in a row halt submissions (policy.h)
  int slots_per_node = 0;        // last reported by a serving deployment; 0: none yet
  std::string error;             // the latest problem, for status
  double demand_seen = 0;        // last time the queue had ready messages
  std::optional<std::uint64_t> ready;
  std::optional<int> consumers;
  std::string next;                    // the decision's next action and why
  std::string controller = "running";  // running, stopped
  double started = 0, updated = 0;
  long pid = 0;
  std::string host;
  unsigned long long sbatch_calls = 0, broker_queries = 0, scheduler_queries = 0;
  unsigned long long polls = 0;  // full polls (the short looks at zero are not)
  Limits limits;
};

std::string to_json(const State& s);
// Throws Error(failure) naming `source` and the key when the text is not a
// state file; numbers by util/json_number's rules (state_reader.cc).
State state_from_json(const std::string& text, const std::string& source);

// <state dir>/autoalloc (state_reader.cc)
std::string controller_dir();
// The controller's state, if one ever ran under this state directory; read
// by state_reader.h's rules (a regular file of yours), else Error.
std::optional<State> load_state();
// One line for `lithops-hpc status`: demand, supply, next action and why.
std::string status_line(const State& s, double now);

// The job name every submission carries, derived from the state directory,
// so a controller restarted after a kill between sbatch and saving its state
// finds that job in squeue and adopts it instead of submitting another.
std::string job_name();

// The world as the controller reaches it. `clock`: unix seconds (empty: the
// system clock); tests step a fake one instead of sleeping.
struct Ports {
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<QueueProbe> queue;
  std::unique_ptr<DeploymentProbe> deployments;
  std::function<double()> clock;
  std::function<bool(const std::string&)> image_exists;  // empty: the file exists (util/fs)
  // Where clients whose runtime has no image are told so (no_image.h);
  // empty: they are not told.
  std::unique_ptr<ClientStore> store;
  // The runtimes whose image is in a directory (<name>.sif); empty: its files.
  std::function<std::vector<std::string>(const std::string&)> list_images;
};

// Messages taken at most per poll from one queue for clients whose runtime
// has no image: a flood waits for the next poll instead of stalling this one.
inline constexpr int k_take_per_poll = 64;
// Runtimes learned from deployments' notices kept at most.
inline constexpr std::size_t k_max_wanted = 256;

// While nothing is held nor pending, the queues (the task queue, and those
// of the runtimes with an image) are looked at this often (seconds),
// whatever --poll says: the first task of a scaled-to-zero controller is
// noticed at once, not at its next poll.
inline constexpr double k_zero_look = 0.5;

class Controller {
public:
  // Takes the lock of <state dir>/autoalloc and loads its state.json.
  Controller(Settings s, Ports p);
  ~Controller();
  Controller(const Controller&) = delete;
  Controller& operator=(const Controller&) = delete;

  // Runs until SIGTERM or SIGINT; returns how that signal ends the command.
  Exit run();

  // Takes on the jobs of the state file and those the scheduler knows by
  // this controller's job name (submitted, then killed before saving).
  void adopt();
  // One look at the world and the actions it calls for; saves the state.
  void poll();
  // What the loop does each time it wakes: a poll when one is due, or, at
  // zero (no job held nor pending), when the queue has just got tasks (one
  // look at the queue only). Returns the seconds to sleep before the next
  // tick: until the next poll, at most k_zero_look at zero.
  double tick();
  // The end (SIGTERM): no more submissions; with `drain` the deployments are
  // asked to stop and jobs not serving yet are cancelled.
  void finish(bool drain);
  const State& state() const { return m_state; }

private:
  double now() const;
  bool at_zero() const;
  bool first_tasks();
  void observe_jobs();
  void observe_deployments(double now);
  void observe_queue(double now);
  void account_ended(JobRecord& r);
  void account_served(JobRecord& r);
  void lift_halt_after_cooloff(double now);
  void observe_runtimes(double now);
  // rt: that runtime's demand and jobs; null: every job, the task queue.
  Snapshot snapshot(double now, const RuntimeDemand* rt) const;
  void take_runtimes();
  // decide() for each runtime in turn, fewest nodes held first, with the
  // limits left by the others; returns the status line's next action.
  std::string decide_per_runtime(double now);
  Limits limits_left_for(const std::string& runtime, bool first) const;
  void carry_out(const Action& a, double now, const RuntimeDemand& rt);
  // Clients whose runtime has no image are told so (no_image.h): from the
  // copies of get_metadata always, from the queue of a runtime of ours with
  // no image while nothing consumes it, and from the task queue when nothing
  // else would take its messages (no job of ours, no consumer).
  void answer_missing_images();
  std::vector<KnownRuntime> known_runtimes() const;
  void take_from(QueueProbe::Source from, const std::string& runtime, std::optional<std::vector<KnownRuntime>>& known);
  // A deployment's notice (dispatch/runtime.h wanted_exchange): it moved a
  // task to the queue of `runtime`, which nothing consumes. One without an
  // image joins m_wanted: its queue is read like that of a runtime of ours.
  void learn(const std::string& runtime, const std::vector<KnownRuntime>& known);
  // Writes what `h` tells the client; false when it could not (logged).
  bool tell(const Handling& h);
  void submit(const Action& a, double now, const RuntimeDemand& rt);
  void save();

  Settings m_s;
  Ports m_p;
  State m_state;
  // The counters of earlier runs (state.json): the ports' own add to them.
  struct {
    unsigned long long sbatch = 0, broker = 0, scheduler = 0;
  } m_earlier;
  std::string m_dir;
  UniqueFd m_lock;
  double m_next_poll = 0;  // clock time the next poll is due
  // Runtimes learned from deployments' notices that have no image (learn()).
  std::set<std::string> m_wanted;
};

}  // namespace lhpc::autoalloc
