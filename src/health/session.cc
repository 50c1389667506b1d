#include "health/session.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <stdexcept>
#include <thread>

#include "util/error.h"
#include "util/strings.h"

namespace lhpc::health {

namespace {
constexpr auto k_finish_step = std::chrono::milliseconds(10);
}  // namespace

Session::Session(MPI_Comm comm, SessionOptions opts)
    : m_opts(std::move(opts)), m_transport(comm), m_loc(locate(m_opts.job, m_opts.status_file)) {
  if (!is_root()) {
    return;
  }
  m_table = std::make_unique<Table>(TableOptions{.job = m_opts.job,
                                                 .runtime = m_opts.runtime,
                                                 .ranks = m_transport.size(),
                                                 .interval = m_opts.interval,
                                                 .rank0_host = m_opts.node,
                                                 .rank0_pid = static_cast<long>(::getpid())},
                                    m_opts.clock);
  prepare(m_loc);
  if (m_opts.keep_ended > 0) {
    prune_ended(unix_now(), m_opts.keep_ended, m_opts.job);
  }
  write_status();
  spdlog::info("health: status file {} (every {:g} s); stop with `lithops-hpc stop {}`", m_loc.status, m_opts.interval,
               m_opts.job);
}

const Table& Session::table() const {
  if (!m_table) {
    throw std::logic_error("health::Session::table() on a rank other than 0");
  }
  return *m_table;
}

void Session::stamp(Report& r) {
  r.version = k_report_version;
  r.seq = ++m_seq;
  r.rank = rank();
  r.pid = static_cast<std::int32_t>(::getpid());
  r.timestamp = unix_now();
  if (r.node[0] == '\0') {
    set_node(r, m_opts.node);
  }
}

void Session::write_status() {
  try {
    health::write_status(m_loc, m_table->to_json());
  } catch (const Error& e) {
    // A full disk or a vanished home must not end a deployment that serves
    // tasks; `status` will call the file stale, which is the truth.
    double now = m_opts.clock.mono();
    if (now - m_last_write > 60) {
      spdlog::warn("health: {}", e.what());
      m_last_write = now;
    }
  }
}

std::vector<Command> Session::poll() {
  std::vector<Command> out;
  if (is_root()) {
    for (const auto& r : m_transport.poll()) {
      m_table->update(r);
    }
    m_table->age();
    if (m_table->take_changed()) {
      write_status();
    }
    return out;
  }
  for (auto c : m_transport.poll_control()) {
    if (c == Command::none) {
      continue;  // rank 0's keep-alive
    }
    if (c == Command::drain || c == Command::stop) {
      bool& seen = c == Command::drain ? m_seen_drain : m_seen_stop;
      if (seen) {
        continue;  // asked before
      }
      seen = true;
    }
    out.push_back(c);
  }
  return out;
}

void Session::report(Report r) {
  stamp(r);
  if (!is_root()) {
    m_transport.send(r);
    return;
  }
  for (const auto& in : m_transport.poll()) {
    m_table->update(in);
  }
  m_table->update(r);
  m_table->age();
  m_table->take_changed();
  if (!m_stop_requested && health::stop_requested(m_loc)) {
    m_stop_requested = true;
    spdlog::info("health: stop requested ({})", m_loc.stop);
  }
  // Keep-alive: a rank that finished early waits in finish() only while it
  // hears from rank 0 (see finish()).
  m_transport.broadcast_control(Command::none);
  write_status();
}

void Session::broadcast(Command c) { m_transport.broadcast_control(c); }

void Session::set_state(DeploymentState s) {
  if (!m_table) {
    return;
  }
  if (m_table->state() != s) {
    spdlog::info("health: deployment {} -> {}", k_deployment_state_names.text(m_table->state()),
                 k_deployment_state_names.text(s));
  }
  m_table->set_state(s);
  write_status();
}

Ending Session::finish(Report final_report, double timeout) {
  final_report.state = State::stopped;
  stamp(final_report);
  if (!is_root()) {
    m_transport.send(final_report);
    return await_finalize(timeout);
  }
  m_table->update(final_report);
  Ending end = await_stopped(timeout);
  if (end.clean) {
    release_ranks();
  }
  return end;
}

// Another rank: rank 0's finalize, for as long as rank 0 is heard from.
Ending Session::await_finalize(double timeout) {
  const auto& clock = m_opts.clock;
  Ending end;
  double last_heard = clock.mono();
  bool finalize = false;
  while (true) {
    for (auto c : m_transport.poll_control()) {
      last_heard = clock.mono();  // any word from rank 0 means it is alive
      finalize = finalize || c == Command::finalize;
    }
    if (finalize && m_transport.idle()) {
      return end;
    }
    double silent = clock.mono() - last_heard;
    if (silent > timeout) {
      end.clean = false;
      end.reason = fmt::format("no word from rank 0 for {:.1f} s while waiting to finalize", silent);
      spdlog::error("health: {}: rank 0 is gone or hung; ending the job with MPI_Abort", end.reason);
      return end;
    }
    std::this_thread::sleep_for(k_finish_step);
  }
}

// Rank 0: every rank's stopped report, keeping the status file and the
// keep-alive going meanwhile; not clean after `timeout` or once every rank
// still missing has gone silent.
Ending Session::await_stopped(double timeout) {
  const auto& clock = m_opts.clock;
  double start = clock.mono();
  double next_write = start;
  while (true) {
    for (const auto& r : m_transport.poll()) {
      m_table->update(r);
    }
    m_table->age();
    auto missing = m_table->ranks_not_reporting(State::stopped);
    double now = clock.mono();
    if (missing.empty()) {
      return {};
    }
    bool all_silent = true;
    for (int r : missing) {
      all_silent = all_silent && m_table->entries()[static_cast<std::size_t>(r)].shown == State::unresponsive;
    }
    if (all_silent || now - start > timeout) {
      return give_up(missing, all_silent, timeout);
    }
    if (now >= next_write) {
      m_table->take_changed();
      write_status();
      m_transport.broadcast_control(Command::none);  // keep-alive
      next_write = now + m_opts.interval;
    } else if (m_table->take_changed()) {
      write_status();
    }
    std::this_thread::sleep_for(k_finish_step);
  }
}

// Rank 0: the ranks that never reported stopped, named in the log and the
// status file's state.
Ending Session::give_up(const std::vector<int>& missing, bool all_silent, double timeout) {
  std::vector<std::string> names;
  for (int r : missing) {
    names.push_back(fmt::format("{} ({})", m_table->label(r),
                                k_state_names.text(m_table->entries()[static_cast<std::size_t>(r)].shown)));
  }
  Ending end;
  end.clean = false;
  end.missing = missing;
  end.reason = fmt::format("{} did not report stopped {}", join(names, ", "),
                           all_silent ? "and went silent" : fmt::format("within {:g} s", timeout));
  spdlog::error("health: {}; ending the job with MPI_Abort (MPI_Finalize would wait for {} forever)", end.reason,
                missing.size() == 1 ? "it" : "them");
  set_state(DeploymentState::failed);
  return end;
}

// Rank 0, every rank stopped: the state, finalize to every rank, the stop
// request removed.
void Session::release_ranks() {
  set_state(DeploymentState::stopped);
  m_transport.broadcast_control(Command::finalize);
  // Small eager messages: these complete at once; the bound is for safety.
  double until = m_opts.clock.mono() + 2;
  while (!m_transport.idle() && m_opts.clock.mono() < until) {
    m_transport.progress();
    std::this_thread::sleep_for(k_finish_step);
  }
  try {
    clear_stop(m_loc);
  } catch (const Error& e) {
    spdlog::warn("health: {}", e.what());
  }
}

}  // namespace lhpc::health
