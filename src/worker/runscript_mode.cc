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

RunscriptMode::RunscriptMode(Worker& worker) : w(worker) {}

void RunscriptMode::start() {
  container::RunscriptOptions ro;
  ro.restart_limit = w.m_cfg.deploy.restart_limit;
  ro.output_fd = w.m_log ? w.m_log->write_fd() : -1;
  m_runscript = std::make_unique<container::Runscript>(
      *w.m_engine, w.m_instance, std::map<std::string, std::string>{{"AMQP_URL", w.m_cfg.rabbitmq.amqp_url}}, ro);
  m_runscript->start();
}

void RunscriptMode::step(milliseconds max_wait) {
  auto& rs = *m_runscript;
  auto now = Clock::now();
  // No SIGCHLD here: check the run at least every 200 ms.
  milliseconds timeout = std::min(max_wait, milliseconds(200));
  for (auto t : {rs.next_wakeup(), w.m_supervisor->next_deadline()}) {
    if (t) {
      timeout = std::min(timeout, std::chrono::duration_cast<milliseconds>(*t - now) + milliseconds(1));
    }
  }
  std::vector<pollfd> none;
  w.poll_round(none, timeout);
  now = Clock::now();
  if (w.m_state == State::draining) {
    step_draining(now);
    return;
  }
  rs.poll(now);
  if (rs.failed()) {
    throw Error(
        Exit::engine, "the runscript keeps failing: " + rs.last_error(),
        std::string(w.m_log ? "its output is in " + w.m_log->path() + " (lithops-hpc logs)" : "its output is above") +
            "; deploy.restart_limit sets how many failures in a row are allowed");
  }
  w.m_supervisor->supervise(now);
}

void RunscriptMode::step_draining(Clock::time_point now) {
  auto& rs = *m_runscript;
  // Non-blocking: SIGTERM once, then watch it go; SIGKILL at the deadline.
  if (!m_signalled && rs.alive()) {
    ::kill(-rs.pid(), SIGTERM);
    m_signalled = true;
  }
  rs.poll(now);  // reaps; a restart is never due this soon (backoff >= 1 s)
  if (!rs.alive() || now >= w.m_drain_deadline) {
    rs.stop(milliseconds(0));
    spdlog::info("runscript stopped");
    w.finish();
  }
}

void RunscriptMode::finish() { m_runscript->stop(milliseconds(5000)); }

void RunscriptMode::fill(WorkerStats& s) const {
  s.restarts += m_runscript->restarts();
  s.broker_connected = m_runscript->alive();
  s.consuming = s.broker_connected;
  s.slots_busy = 0;
}

}  // namespace lhpc::worker
