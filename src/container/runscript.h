// Runscript mode: supervises `ENGINE run instance://NAME` (the image's own
// %runscript, e.g. the stock Lithops entry point) for the rank's event loop.
// The loop calls poll() on SIGCHLD and at next_wakeup(); poll() never sleeps:
// it reaps, and restarts after a capped exponential backoff (1 s, 2 s, 4 s,
// ... 30 s). A streak of restart_limit + 1 runs that each die within
// `window` of their start means the instance is broken: the supervisor
// reports failed() and stops restarting, so healthy nodes take the work.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "container/engine.h"
#include "util/process.h"

namespace lhpc::container {

struct RunscriptOptions {
  // Restarts allowed in one streak of failures (deploy.restart_limit); the
  // failure after them is final. 0: the first failure is final.
  int restart_limit = 5;
  std::chrono::milliseconds backoff_initial{1000};
  std::chrono::milliseconds backoff_max{30000};
  // A run that stays up this long was healthy: it ends the failure streak
  // and the backoff starts again from backoff_initial.
  std::chrono::milliseconds window{60000};
  // Each run's stdout and stderr (the stock entry point logs every call):
  // -1, ours; else e.g. the rank's handler log (logs/).
  int output_fd = -1;
};

class Runscript {
public:
  using Clock = std::chrono::steady_clock;

  // `engine.run_argv(instance)` with `vars` (AMQP_URL) passed only through
  // engine.child_env(): never in argv. Throws Error(Exit::config) for the
  // host engine (no image, so no runscript).
  Runscript(const Engine& engine, const std::string& instance, const std::map<std::string, std::string>& vars,
            RunscriptOptions opts = {});
  // Any command with any environment: the seam tests use to supervise a
  // small script instead of a container.
  Runscript(std::vector<std::string> argv, Env env, RunscriptOptions opts = {});

  Runscript(const Runscript&) = delete;
  Runscript& operator=(const Runscript&) = delete;
  Runscript(Runscript&&) = default;
  Runscript& operator=(Runscript&&) = default;
  ~Runscript() = default;  // the Child kills a run still going

  // Starts the first run (a failure to spawn counts as a failed run).
  void start(Clock::time_point now = Clock::now());
  // Non-blocking: reaps an exited run, starts a due restart. `now` is a
  // parameter so tests can walk the backoff without waiting for it.
  void poll(Clock::time_point now = Clock::now());
  // When the next restart is due (nullopt: nothing scheduled).
  std::optional<Clock::time_point> next_wakeup() const;

  int restarts() const { return m_restarts; }            // runs started after the first
  int consecutive_failures() const { return m_streak; }  // in the current streak
  bool alive() const { return m_child.running(); }       // a run is going (as of the last poll)
  bool failed() const { return m_state == State::failed; }
  bool stopped() const { return m_state == State::stopped; }
  const std::string& last_error() const { return m_last_error; }
  pid_t pid() const { return m_child.pid(); }

  // SIGTERM to the run's process group, SIGKILL after `grace`; no restarts after.
  void stop(std::chrono::milliseconds grace);

  // What runs, for logs and tests (argv holds no secret; env does).
  const std::vector<std::string>& argv() const { return m_argv; }
  const Env& env() const { return m_env; }

private:
  enum class State { idle, running, waiting, failed, stopped };
  void launch(Clock::time_point now);
  void record_failure(Clock::time_point now, const std::string& what);

  std::vector<std::string> m_argv;
  Env m_env;
  RunscriptOptions m_opts;
  State m_state = State::idle;
  Child m_child;
  Clock::time_point m_started{};
  Clock::time_point m_next_start{};
  int m_restarts = 0;
  int m_streak = 0;
  bool m_launched_once = false;
  std::string m_last_error;
};

}  // namespace lhpc::container
