// One node's worker as a steppable object: the container instance, then
// either the dispatcher (broker consumer + warm handler pool) or the image's
// own runscript under supervision. `lithops-hpc worker` is a thin loop over
// it; `deploy` runs the same loop per rank with its health timer beside it.
// This file is the lifecycle; each mode (behind the Mode interface of
// mode.h, picked once from deploy.mode) and the instance supervision have
// their own file beside it (dispatch_mode, runscript_mode, instance).
//
//   Worker w(cfg, {rank, node, jobid, slots});
//   w.set_signal_pipe(&signals);        // SIGINT/SIGTERM: drain; a second one: stop now
//   w.start(image);                      // instance, handlers, broker
//   while (!w.finished()) w.step(500ms); // one poll() round each
//   w.stop();                            // instance gone (idempotent)
//
// Delivery is at-least-once: a task running while the broker connection is
// lost is redelivered by the broker and may run twice; a task whose
// message was split runs its republished remainder twice if this worker dies
// before acking the original.
#pragma once

#include <poll.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "container/engine.h"
#include "util/backoff.h"
#include "worker/broker.h"

namespace lhpc {
class SignalPipe;
}
namespace lhpc::logs {
class Capture;
}

namespace lhpc::worker {

class Mode;
struct ModeContext;
class InstanceSupervisor;

// A worker's state. `starting` also covers a running dispatch-mode worker
// with no ready handler yet (it cannot take a task).
enum class State : std::uint8_t { created, starting, running, draining, stopped, failed };

struct WorkerIdentity {
  int rank = 0;
  std::string node;   // empty: config::current_placeholders().node
  std::string jobid;  // empty: config::current_placeholders().jobid
  int slots = 0;      // 0: singularity.worker_processes, and 0 there: the node's cores (a GPU runtime: its GPU slots)
  // Ranks on this node and this one's index among them: they split a GPU
  // runtime's slots (gpu::share_of).
  int ranks_on_node = 1;  // the node's memory is shared among them (runtime_memory caps)
  int index_on_node = 0;
};

struct WorkerStats {
  State state = State::created;
  int slots_busy = 0;
  int slots_total = 0;
  std::uint64_t tasks_done = 0;         // calls run (function errors included)
  std::uint64_t tasks_failed = 0;       // calls a handler could not run
  std::uint64_t tasks_requeued = 0;     // given back to the queue (crash, drain)
  std::uint64_t dead_lettered = 0;      // moved to <queue>.dead
  bool broker_connected = false;        // runscript mode: the runscript is up
  bool consuming = false;               // the task queue's consumer is up (runscript mode: as broker_connected)
  bool broker_blocked = false;          // connection.blocked: a memory or disk alarm on the broker
  std::uint64_t duplicates = 0;         // calls that finished after the broker took their message back
  std::uint64_t consumer_timeouts = 0;  // channels the broker closed for its consumer_timeout
  bool instance_alive = false;
  int restarts = 0;  // handler, runscript and instance restarts
  std::string last_error;
  std::vector<std::vector<std::string>> gpus;  // a GPU runtime: slot k's devices; empty: a CPU runtime
  // A GPU runtime's slots taken out of service (their handler kept dying:
  // deploy.restart_limit), and why; slots_total counts only the others.
  std::map<int, std::string> gpus_out;
};

// The node's usable cores (sched_getaffinity), at least 1.
int node_cores();

// `s` with every character but letters, digits, '.', '_' and '-' replaced by
// '_': safe in instance names and file names.
std::string sanitize_name(std::string s);

// What a test replaces; each one left empty is the real one.
struct WorkerPorts {
  std::unique_ptr<container::Engine> engine;  // null: made from singularity.engine
  std::unique_ptr<BrokerConnector> broker;    // null: from rabbitmq.* (dispatch mode's only)
  std::optional<Backoff> instance_backoff;    // restarts of a dead instance; null: 1 s doubling to 30 s
  std::optional<Env> gpu_env;                 // where a GPU runtime finds Slurm's GPUs; null: ours
  std::string gpu_root = "/";                 // where it finds the node's GPUs (/proc, /sys)
};

class Worker {
public:
  using Clock = std::chrono::steady_clock;

  // `cfg` already expanded (config::expanded). The mode is picked here,
  // once, from deploy.mode.
  Worker(const config::Config& cfg, WorkerIdentity id, WorkerPorts ports = {});
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // SIGINT/SIGTERM read from it drain the worker; a second one stops it at once.
  void set_signal_pipe(SignalPipe* signals);
  // Another descriptor for step() to poll (POLLIN); `on_ready` runs when it is.
  void watch_fd(int fd, std::function<void()> on_ready);

  // Starts the instance from `image` (ignored by the host engine), then the
  // handlers and the broker connection (dispatch) or the runscript. A GPU
  // runtime first finds its GPUs and splits them into its slots (gpu/).
  // Throws Error(Exit::engine) when the instance does not start or a GPU
  // runtime has too few GPUs, and what else stopped it (the in-flight
  // record, the handler script); the worker is failed then, and stop() ends
  // what did start.
  void start(const std::string& image);
  // One poll() round over the broker socket, handler pipes, the signal pipe
  // and timers; never blocks longer than `max_wait`.
  void step(std::chrono::milliseconds max_wait);
  // Stop consuming; running calls get deploy.drain_timeout to finish.
  void request_drain();
  bool finished() const;
  bool failed() const { return m_state == State::failed; }
  WorkerStats stats() const;
  // Stops whatever still runs, then the instance. Idempotent.
  void stop();

  const std::string& instance_name() const { return m_instance; }
  int slots() const { return m_slots; }

private:
  void fail(const std::string& why, const std::string& hint = "");
  void finish(std::chrono::milliseconds handler_grace = std::chrono::milliseconds(5000));
  void on_signals();
  // One poll() over the signal pipe, the watched fds and the mode's own
  // `fds` (whose revents it fills); handles signals and watched fds itself.
  void poll_round(std::vector<pollfd>& fds, std::chrono::milliseconds timeout);
  void start_parts(const std::string& image);
  void plan_gpu_slots();
  container::InstanceSpec instance_spec(const std::string& image) const;
  void open_handler_log();
  std::unique_ptr<Mode> make_mode(std::unique_ptr<BrokerConnector> broker);

  config::Config m_cfg;
  WorkerIdentity m_id;
  std::unique_ptr<container::Engine> m_engine;
  std::string m_instance;
  int m_slots = 1;
  std::optional<Env> m_gpu_env;
  std::string m_gpu_root;
  std::vector<std::vector<std::string>> m_gpus;  // a GPU runtime: slot k's devices
  State m_state = State::created;
  Clock::time_point m_drain_deadline{};
  std::string m_last_error;
  SignalPipe* m_signals = nullptr;
  std::vector<std::pair<int, std::function<void()>>> m_watched;
  std::unique_ptr<InstanceSupervisor> m_supervisor;
  std::unique_ptr<logs::Capture> m_log;    // before the mode: its handlers write to it
  std::unique_ptr<ModeContext> m_context;  // what the mode sees of this worker
  std::unique_ptr<Mode> m_mode;            // picked once, from deploy.mode
};

}  // namespace lhpc::worker
