#include "dispatch/handler_pool.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>

#include "util/error.h"

namespace lhpc::dispatch {

namespace {

void set_nonblocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) {
    ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  }
}

std::string handler_name(int h, int count) {
  return h == count - 1 ? std::string("control handler") : "handler " + std::to_string(h);
}

}  // namespace

HandlerPool::HandlerPool(int count, std::function<HandlerCommand(int h)> command, PoolOptions opts, Listener& listener)
    : m_command(std::move(command)), m_opts(opts), m_listener(listener), m_procs(static_cast<std::size_t>(count)) {
  for (auto& p : m_procs) {
    p.backoff = Backoff(m_opts.backoff_first, m_opts.backoff_max);
    p.deaths = FailureWindow(m_opts.restart_limit, m_opts.death_window);
  }
}

HandlerPool::~HandlerPool() {
  // Child handles kill what is still running; say nothing more.
  m_stopping = true;
}

void HandlerPool::start() {
  auto now = Clock::now();
  for (int h = 0; h < size(); ++h) {
    spawn_one(h, now);
  }
}

void HandlerPool::spawn_one(int h, Clock::time_point now) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  p.to_write.clear();
  p.written = 0;
  p.partial.clear();
  p.lost_why.clear();
  if (p.was_started) {
    ++m_restarts;
  }
  p.was_started = true;
  p.started = now;
  try {
    HandlerCommand cmd = m_command(h);
    SpawnOptions so;
    so.argv = cmd.argv;
    so.env = std::move(cmd.env);
    so.pipe_stdin = true;
    so.pipe_stdout = true;
    so.stderr_fd = cmd.stderr_fd;
    // Its own process group: a Ctrl-C at the terminal reaches the worker,
    // which drains, not the handlers; and a kill reaches its children.
    so.new_process_group = true;
    p.child = spawn(so);
  } catch (const Error& e) {
    p.state = State::down;
    m_last_error = handler_name(h, size()) + ": " + e.what();
    spdlog::error("{}", m_last_error);
    record_death(h, now, e.what());
    return;
  }
  set_nonblocking(p.child.in().get());
  set_nonblocking(p.child.out().get());
  p.state = State::starting;
  spdlog::debug("{} started (pid {})", handler_name(h, size()), p.child.pid());
}

void HandlerPool::send(int h, const std::string& line) {
  if (h < 0 || h >= size()) {
    return;
  }
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  if (p.state != State::ready || !p.lost_why.empty()) {
    return;  // it is being replaced; the dispatcher hears of the loss from tick()
  }
  p.to_write += line;
  flush(h);
}

void HandlerPool::flush(int h) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  while (p.written < p.to_write.size()) {
    ssize_t n = ::write(p.child.in().get(), p.to_write.data() + p.written, p.to_write.size() - p.written);
    if (n > 0) {
      p.written += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return;  // POLLOUT will bring us back
    }
    if (p.lost_why.empty()) {
      p.lost_why = "its input pipe closed (" + errno_text(errno) + ")";
    }
    return;
  }
  p.to_write.clear();
  p.written = 0;
}

void HandlerPool::add_pollfds(std::vector<pollfd>& fds, std::vector<int>& tags) const {
  for (int h = 0; h < size(); ++h) {
    const Proc& p = m_procs[static_cast<std::size_t>(h)];
    if ((p.state != State::starting && p.state != State::ready) || !p.lost_why.empty()) {
      continue;
    }
    fds.push_back({const_cast<Proc&>(p).child.out().get(), POLLIN, 0});
    tags.push_back(h * 2);
    if (p.written < p.to_write.size()) {
      fds.push_back({const_cast<Proc&>(p).child.in().get(), POLLOUT, 0});
      tags.push_back(h * 2 + 1);
    }
  }
}

void HandlerPool::handle(int tag, short revents) {
  int h = tag / 2;
  if (h < 0 || h >= size()) {
    return;
  }
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  if (p.state != State::starting && p.state != State::ready) {
    return;
  }
  if (tag % 2 == 0) {
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
      read_from(h);
    }
  } else if (revents & (POLLOUT | POLLERR | POLLHUP)) {
    flush(h);
  }
  report_losses(Clock::now());
}

void HandlerPool::read_from(int h) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  char buf[65536];
  while (p.lost_why.empty()) {
    ssize_t n = ::read(p.child.out().get(), buf, sizeof buf);
    if (n > 0) {
      p.partial.append(buf, static_cast<std::size_t>(n));
      std::size_t start = 0;
      for (std::size_t nl; (nl = p.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        on_line(h, p.partial.substr(start, nl - start));
        if (!p.lost_why.empty() || p.state == State::down) {
          return;
        }
      }
      p.partial.erase(0, start);
      if (static_cast<std::size_t>(n) < sizeof buf) {
        return;  // drained for now (a read would only say EAGAIN); poll() reports more
      }
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return;
    }
    p.lost_why = "closed its output";  // EOF: it exited or is exiting
    return;
  }
}

void HandlerPool::on_line(int h, const std::string& line) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  if (line.find_first_not_of(" \t\r") == std::string::npos) {
    return;
  }
  Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    spdlog::warn("{} wrote a line that is not protocol JSON, ignored: {}", handler_name(h, size()),
                 line.substr(0, 200));
    return;
  }
  if (json_string(j, "event") == "ready") {
    if (p.state == State::starting) {
      // No reset of the backoff here: a handler that dies right after this
      // line must not be restarted at once, forever. Its deaths age out of
      // the window instead.
      p.state = State::ready;
      auto lithops = j.contains("lithops") && j["lithops"].is_string() ? j["lithops"].get<std::string>() : "";
      if (lithops.empty()) {
        spdlog::warn("{} (pid {}) cannot import Lithops: its tasks will fail (see its stderr)", handler_name(h, size()),
                     json_int(j, "pid"));
      } else {
        spdlog::debug("{} ready (pid {}, Python {}, Lithops {})", handler_name(h, size()), json_int(j, "pid"),
                      json_string(j, "python", "?"), lithops);
      }
      m_listener.handler_ready(h, j);
    }
    return;
  }
  if (p.state != State::ready) {
    spdlog::warn("{} answered before it was ready, ignored", handler_name(h, size()));
    return;
  }
  m_listener.handler_reply(h, j);
}

void HandlerPool::lose(int h, const std::string& why) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  bool was_ready = p.state == State::ready;
  std::string detail = why;
  if (p.child.running()) {
    // Closing its output usually means it is exiting: give it a moment to
    // tell us how, then make sure.
    if (!p.child.wait_for(std::chrono::milliseconds(200))) {
      p.child.signal(SIGKILL);
      p.child.wait();
      detail += "; killed it";
    }
  }
  if (auto st = p.child.status()) {
    detail = describe_status(*st);
  }
  p.child = Child();
  p.state = State::down;
  p.lost_why.clear();
  m_last_error = handler_name(h, size()) + " " + detail;
  if (!was_ready) {
    spdlog::error("{} died before it was ready: {} (its output says why)", handler_name(h, size()), detail);
  } else {
    spdlog::warn("{} {}", handler_name(h, size()), detail);
  }
  record_death(h, Clock::now(), detail);
  if (was_ready) {
    m_listener.handler_lost(h, detail);
  } else {
    m_listener.handler_failed_to_start(h);
  }
}

void HandlerPool::record_death(int h, Clock::time_point now, const std::string& detail) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  int deaths = p.deaths.record(now);
  if (deaths == 1) {
    p.backoff.reset();  // the first death in a window: it had been up a while
  }
  if (deaths > m_opts.restart_limit) {
    give_up(h, deaths, detail);
    return;
  }
  auto delay = p.backoff.next();
  p.restart_at = now + delay;
  spdlog::info("restarting {} in {:.1f} s ({} of {} deaths within {} s)", handler_name(h, size()),
               delay.count() / 1000.0, deaths, m_opts.restart_limit, m_opts.death_window.count() / 1000);
}

void HandlerPool::give_up(int h, int deaths, const std::string& detail) {
  Proc& p = m_procs[static_cast<std::size_t>(h)];
  p.state = State::failed;
  std::string why = fmt::format("died {} times within {} s (deploy.restart_limit = {}); last: {}", deaths,
                                m_opts.death_window.count() / 1000, m_opts.restart_limit, detail);
  m_last_error = handler_name(h, size()) + " " + why;
  bool slot = h < size() - 1;
  if (!m_opts.retire_slots || !slot) {
    m_failed = true;
    spdlog::error("{}", m_last_error);
    return;
  }
  p.retired_why = why;
  int left = 0;
  for (int k = 0; k < size() - 1; ++k) {
    left += m_procs[static_cast<std::size_t>(k)].retired_why.empty() ? 1 : 0;
  }
  spdlog::error("{}: slot {} taken out of service ({} of {} slots left)", m_last_error, h, left, size() - 1);
  m_listener.handler_retired(h, why);
  if (left == 0) {
    m_failed = true;
    m_last_error = fmt::format("every slot is out of service; the last, {}", m_last_error);
  }
}

void HandlerPool::report_losses(Clock::time_point) {
  for (int h = 0; h < size(); ++h) {
    Proc& p = m_procs[static_cast<std::size_t>(h)];
    if (!p.lost_why.empty() && !m_stopping) {
      lose(h, p.lost_why);
    }
  }
}

void HandlerPool::tick(Clock::time_point now) {
  if (m_stopping) {
    return;
  }
  report_losses(now);
  for (int h = 0; h < size(); ++h) {
    Proc& p = m_procs[static_cast<std::size_t>(h)];
    if (p.state == State::starting && now - p.started > m_opts.ready_timeout) {
      p.lost_why = "sent no ready line within " + std::to_string(m_opts.ready_timeout.count() / 1000) + " s";
      lose(h, p.lost_why);
    }
    if (p.state == State::down && now >= p.restart_at && !m_hold) {
      spawn_one(h, now);
    }
  }
}

std::optional<HandlerPool::Clock::time_point> HandlerPool::next_deadline() const {
  std::optional<Clock::time_point> t;
  auto earliest = [&](Clock::time_point c) {
    if (!t || c < *t) {
      t = c;
    }
  };
  for (const auto& p : m_procs) {
    if (!p.lost_why.empty()) {
      earliest(Clock::now());
    } else if (p.state == State::down && !m_hold) {
      earliest(p.restart_at);
    } else if (p.state == State::starting) {
      earliest(p.started + m_opts.ready_timeout);
    }
  }
  return t;
}

void HandlerPool::stop(std::chrono::milliseconds grace) {
  m_stopping = true;
  for (auto& p : m_procs) {
    p.child.in().reset();  // EOF: the handler exits 0 when idle
  }
  // All at once, each phase with one deadline: K handlers take no longer than one.
  auto wait_all = [&](std::chrono::milliseconds limit) {
    auto deadline = Clock::now() + limit;
    for (auto& p : m_procs) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (p.child.running()) {
        p.child.wait_for(std::max(left, std::chrono::milliseconds(0)));
      }
    }
  };
  wait_all(grace);
  for (auto& p : m_procs) {
    p.child.signal(SIGTERM);
  }
  wait_all(std::chrono::milliseconds(2000));
  for (auto& p : m_procs) {
    if (p.child.running()) {
      p.child.signal(SIGKILL);
      p.child.wait();
    }
    p.child = Child();
    p.state = State::down;
  }
}

pid_t HandlerPool::pid(int h) const {
  return (h >= 0 && h < size()) ? m_procs[static_cast<std::size_t>(h)].child.pid() : -1;
}

bool HandlerPool::ready(int h) const {
  return h >= 0 && h < size() && m_procs[static_cast<std::size_t>(h)].state == State::ready;
}

const std::string& HandlerPool::retired_why(int h) const {
  static const std::string none;
  return (h >= 0 && h < size()) ? m_procs[static_cast<std::size_t>(h)].retired_why : none;
}

int HandlerPool::ready_count() const {
  int n = 0;
  for (const auto& p : m_procs) {
    n += p.state == State::ready ? 1 : 0;
  }
  return n;
}

}  // namespace lhpc::dispatch
