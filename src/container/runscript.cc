// Runscript supervisor: spawn, reap, capped exponential backoff, give-up, stop.
#include "container/runscript.h"

#include <spdlog/spdlog.h>

#include "util/backoff.h"
#include "util/error.h"
#include "util/strings.h"

namespace lhpc::container {

namespace {

std::string seconds_text(Runscript::Clock::duration d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", std::chrono::duration<double>(d).count());
  return buf;
}

}  // namespace

Runscript::Runscript(const Engine& engine, const std::string& instance, const std::map<std::string, std::string>& vars,
                     RunscriptOptions opts)
    : Runscript(engine.run_argv(instance), engine.child_env(Env::current(), vars), opts) {}

Runscript::Runscript(std::vector<std::string> argv, Env env, RunscriptOptions opts)
    : m_argv(std::move(argv)), m_env(std::move(env)), m_opts(opts) {
  if (m_argv.empty()) {
    throw Error(Exit::failure, "runscript: empty command line");
  }
}

void Runscript::start(Clock::time_point now) {
  if (m_state == State::idle) {
    launch(now);
  }
}

void Runscript::launch(Clock::time_point now) {
  if (m_launched_once) {
    ++m_restarts;
  }
  m_launched_once = true;
  m_started = now;
  try {
    // Its own process group: the engine's helpers and whatever the runscript
    // starts all get stop()'s signals.
    m_child = spawn({.argv = m_argv,
                     .env = m_env,
                     .stdout_fd = m_opts.output_fd,
                     .stderr_fd = m_opts.output_fd,
                     .new_process_group = true});
  } catch (const Error& e) {
    record_failure(now, std::string("cannot start the runscript: ") + e.what());
    return;
  }
  m_state = State::running;
  spdlog::info("runscript started (pid {}): {}", m_child.pid(), join_argv(m_argv));
}

void Runscript::record_failure(Clock::time_point now, const std::string& what) {
  m_last_error = what;
  if (now - m_started >= m_opts.window) {
    m_streak = 0;  // that run was healthy: this is a new streak
  }
  ++m_streak;
  if (m_streak > m_opts.restart_limit) {
    m_state = State::failed;
    spdlog::error("{}; giving up after {} failures in a row (deploy.restart_limit = {})", what, m_streak,
                  m_opts.restart_limit);
    return;
  }
  // The streak's n-th failure waits the backoff's n-th delay.
  Backoff backoff(m_opts.backoff_initial, m_opts.backoff_max);
  auto delay = backoff.next();
  for (int i = 1; i < m_streak; ++i) {
    delay = backoff.next();
  }
  m_next_start = now + delay;
  m_state = State::waiting;
  spdlog::warn("{}; restarting in {} ({} of {} restarts)", what, seconds_text(delay), m_streak, m_opts.restart_limit);
}

void Runscript::poll(Clock::time_point now) {
  if (m_state == State::running && m_child.try_wait()) {
    int st = *m_child.status();
    record_failure(now, "the runscript " + describe_status(st) + " after " + seconds_text(now - m_started));
  }
  if (m_state == State::waiting && now >= m_next_start) {
    launch(now);
  }
}

std::optional<Runscript::Clock::time_point> Runscript::next_wakeup() const {
  if (m_state == State::waiting) {
    return m_next_start;
  }
  return std::nullopt;
}

void Runscript::stop(std::chrono::milliseconds grace) {
  m_state = State::stopped;
  m_child.terminate(grace);
}

}  // namespace lhpc::container
