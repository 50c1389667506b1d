#include "worker/instance.h"

#include <spdlog/spdlog.h>

#include "util/error.h"

namespace lhpc::worker {

using std::chrono::milliseconds;

InstanceSupervisor::InstanceSupervisor(container::Engine& engine, int restart_limit, Backoff backoff)
    : m_engine(engine), m_restart_limit(restart_limit), m_backoff(backoff) {}

void InstanceSupervisor::start(const container::InstanceSpec& spec) {
  m_spec = spec;
  m_engine.start_instance(spec);
  m_state = State::running;
  m_next_check = Clock::now() + k_check_every;
}

void InstanceSupervisor::supervise(Clock::time_point now) {
  if (m_state == State::waiting && now >= m_restart_at) {
    spdlog::info("starting instance {} again", m_spec.name);
    m_engine.start_instance(m_spec);
    m_state = State::running;
    m_next_check = now + k_check_every;
    return;
  }
  if (m_state == State::running && (m_check_soon || now >= m_next_check)) {
    look(now);
  }
  m_check_soon = false;
}

void InstanceSupervisor::look(Clock::time_point now) {
  m_next_check = now + k_check_every;
  if (m_engine.instance_alive(m_spec.name)) {
    m_backoff.reset();  // up since the last restart, at least until now
    return;
  }
  ++m_restarts;
  if (m_restarts > m_restart_limit) {
    throw Error(Exit::engine,
                "instance " + m_spec.name + " died " + std::to_string(m_restarts) +
                    " times (deploy.restart_limit = " + std::to_string(m_restart_limit) + ")",
                "look for the engine's own log of the instance (out of memory, a killed process) and raise "
                "deploy.restart_limit only if the cause is transient");
  }
  auto delay = m_backoff.next();
  spdlog::error("instance {} is gone: restarting it in {:.1f} s ({} of {})", m_spec.name, delay.count() / 1000.0,
                m_restarts, m_restart_limit);
  // A dead instance may still be listed for a moment: stop it for good first.
  try {
    m_engine.stop_instance(m_spec.name, milliseconds(5000));
  } catch (const Error& e) {
    spdlog::debug("stopping the dead instance: {}", e.what());
  }
  m_state = State::waiting;
  m_restart_at = now + delay;
}

std::optional<InstanceSupervisor::Clock::time_point> InstanceSupervisor::next_deadline() const {
  if (m_state == State::waiting) {
    return m_restart_at;
  }
  if (m_state == State::running) {
    return m_check_soon ? Clock::now() : m_next_check;
  }
  return std::nullopt;
}

void InstanceSupervisor::stop() {
  if (m_state == State::none || m_state == State::stopped) {
    m_state = State::stopped;
    return;
  }
  bool was_waiting = m_state == State::waiting;
  m_state = State::stopped;
  if (!was_waiting) {
    spdlog::info("stopping instance {}", m_spec.name);
    m_engine.stop_instance(m_spec.name, milliseconds(10000));
  }
}

}  // namespace lhpc::worker
