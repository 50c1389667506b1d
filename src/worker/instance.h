// Instance supervision: the one container instance a worker's handlers or
// runscript run in. A dead instance is stopped for good and started again
// after a capped exponential backoff (a crash loop must not spin); after
// deploy.restart_limit restarts the worker fails, so healthy nodes take the work.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "container/engine.h"
#include "util/backoff.h"

namespace lhpc::worker {

class InstanceSupervisor {
public:
  using Clock = std::chrono::steady_clock;
  // How often a running instance is looked at when nothing hints it died.
  static constexpr std::chrono::seconds k_check_every{30};

  InstanceSupervisor(container::Engine& engine, int restart_limit,
                     Backoff backoff = Backoff(std::chrono::milliseconds(1000), std::chrono::milliseconds(30000)));

  // Throws Error(Exit::engine) when the engine cannot start it.
  void start(const container::InstanceSpec& spec);
  // Something hints that the instance died (a handler did): look at the next supervise().
  void check_soon() { m_check_soon = true; }
  // Looks when due; restarts a dead instance once its backoff has passed.
  // Throws Error(Exit::engine) past the restart limit.
  void supervise(Clock::time_point now);
  std::optional<Clock::time_point> next_deadline() const;
  // Stops it (idempotent); no restart after.
  void stop();

  bool started() const { return m_state != State::none && m_state != State::stopped; }
  // Running as of the last look (false while it waits for its restart).
  bool alive() const { return m_state == State::running; }
  bool restarting() const { return m_state == State::waiting; }
  int restarts() const { return m_restarts; }
  const std::string& name() const { return m_spec.name; }

private:
  enum class State { none, running, waiting, stopped };
  void look(Clock::time_point now);

  container::Engine& m_engine;
  int m_restart_limit;
  Backoff m_backoff;
  container::InstanceSpec m_spec;  // as started: restarts reuse it
  State m_state = State::none;
  bool m_check_soon = false;
  int m_restarts = 0;
  Clock::time_point m_next_check{};
  Clock::time_point m_restart_at{};
};

}  // namespace lhpc::worker
