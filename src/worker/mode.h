// What a worker mode is to the worker: the steps of its lifecycle (Mode) and
// the few things of the worker a mode may use (ModeContext). The worker's
// lifecycle (states, signals, drain deadline, fail, stop) stays in worker.cc;
// a mode knows only how it does each step (dispatch_mode, runscript_mode).
// Nothing here knows which modes exist: worker.cc picks one, once.
#pragma once

#include <poll.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "container/engine.h"
#include "worker/worker.h"

namespace lhpc::logs {
class Capture;
}

namespace lhpc::worker {

class InstanceSupervisor;

// What a mode gets of its worker; references live as long as the worker.
struct ModeContext {
  using Clock = std::chrono::steady_clock;
  const config::Config& cfg;  // expanded
  const WorkerIdentity& id;   // node and jobid filled in
  int slots = 1;
  // A GPU runtime: slot k's own variables (gpu::slot_env), for its handler
  // alone, the same after every restart; empty: a CPU runtime.
  std::vector<std::map<std::string, std::string>> slot_env;
  container::Engine& engine;
  const std::string& instance_name;
  InstanceSupervisor& instance;  // the one instance: the mode tells it when to look, and waits for its restarts
  logs::Capture* log = nullptr;  // handler output; set before Mode::start, null: it stays in ours
  // The worker's state as the loop sees it (running or draining while stepped).
  std::function<State()> state;
  // When a drain gives up on running calls (a second signal moves it to now).
  std::function<Clock::time_point()> drain_deadline;
  // One poll() over the worker's own descriptors (signals, watched fds) and
  // `fds`, whose revents it fills; never longer than the timeout.
  std::function<void(std::vector<pollfd>& fds, std::chrono::milliseconds timeout)> poll;
  // A trouble the mode works around (a lost broker): shown as the last error.
  std::function<void(const std::string& why)> note_error;
};

// A mode's step found its work done (drained): the worker finishes it,
// giving busy handlers `grace` to exit, and stops.
struct Done {
  std::chrono::milliseconds grace{5000};
};

// One way of running a node's work in the instance. Failures a user can
// cause are thrown as Error from start and step: the worker fails with them.
class Mode {
public:
  virtual ~Mode() = default;
  // Before the instance starts from `spec`: what the mode needs of it (binds).
  virtual void prepare(container::InstanceSpec& spec) = 0;
  // The instance runs: start the mode's processes and connections.
  virtual void start() = 0;
  // One poll() round (through ModeContext::poll), never longer than `max_wait`.
  virtual std::optional<Done> step(std::chrono::milliseconds max_wait) = 0;
  // The worker drains: take no new work; running work gets until the drain deadline.
  virtual void drain() = 0;
  // The worker failed: stop taking work and give back what is held.
  virtual void abort() = 0;
  // Done or failed: end the mode's processes (busy ones get `grace`).
  virtual void finish(std::chrono::milliseconds grace) = 0;
  // End whatever still runs. Idempotent, and safe when start never ran or threw.
  virtual void stop() = 0;
  // The mode's part of the stats (slots, counters, connection).
  virtual void fill(WorkerStats& s) const = 0;
};

}  // namespace lhpc::worker
