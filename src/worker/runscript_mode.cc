#include "worker/runscript_mode.h"

#include <signal.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>

#include "logs/capture.h"
#include "util/error.h"
#include "worker/instance.h"

namespace lhpc::worker {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

RunscriptMode::RunscriptMode(const ModeContext& ctx) : m_ctx(ctx) {}

void RunscriptMode::start() {
  container::RunscriptOptions ro;
  ro.restart_limit = m_ctx.cfg.deploy.restart_limit;
  ro.output_fd = m_ctx.log ? m_ctx.log->write_fd() : -1;
  m_runscript = std::make_unique<container::Runscript>(
      m_ctx.engine, m_ctx.instance_name, std::map<std::string, std::string>{{"AMQP_URL", m_ctx.cfg.rabbitmq.amqp_url}},
      ro);
  m_runscript->start();
}

std::optional<Done> RunscriptMode::step(milliseconds max_wait) {
  auto& rs = *m_runscript;
  auto now = Clock::now();
  // No SIGCHLD here: check the run at least every 200 ms.
  milliseconds timeout = std::min(max_wait, milliseconds(200));
  for (auto t : {rs.next_wakeup(), m_ctx.instance.next_deadline()}) {
    if (t) {
      timeout = std::min(timeout, std::chrono::duration_cast<milliseconds>(*t - now) + milliseconds(1));
    }
  }
  std::vector<pollfd> none;
  m_ctx.poll(none, timeout);
  now = Clock::now();
  if (m_ctx.state() == State::draining) {
    return step_draining(now);
  }
  rs.poll(now);
  if (rs.failed()) {
    throw Error(Exit::engine, "the runscript keeps failing: " + rs.last_error(),
                std::string(m_ctx.log ? "its output is in " + m_ctx.log->path() + " (lithops-hpc logs)"
                                      : "its output is above") +
                    "; deploy.restart_limit sets how many failures in a row are allowed");
  }
  m_ctx.instance.supervise(now);
  return std::nullopt;
}

std::optional<Done> RunscriptMode::step_draining(Clock::time_point now) {
  auto& rs = *m_runscript;
  // Non-blocking: SIGTERM once, then watch it go; SIGKILL at the deadline.
  if (!m_signalled && rs.alive()) {
    ::kill(-rs.pid(), SIGTERM);
    m_signalled = true;
  }
  rs.poll(now);  // reaps; a restart is never due this soon (backoff >= 1 s)
  if (!rs.alive() || now >= m_ctx.drain_deadline()) {
    rs.stop(milliseconds(0));
    spdlog::info("runscript stopped");
    return Done{};
  }
  return std::nullopt;
}

void RunscriptMode::drain() { spdlog::info("draining: stopping the runscript"); }

void RunscriptMode::finish(milliseconds) {
  if (m_runscript) {
    m_runscript->stop(milliseconds(5000));
  }
}

void RunscriptMode::fill(WorkerStats& s) const {
  if (!m_runscript) {
    return;  // never started
  }
  s.restarts += m_runscript->restarts();
  s.broker_connected = m_runscript->alive();
  s.consuming = s.broker_connected;
  s.slots_busy = 0;
}

}  // namespace lhpc::worker
