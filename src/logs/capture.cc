#include "logs/capture.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>

#include "util/error.h"

namespace lhpc::logs {

namespace {
// A partial line longer than this is written as it is (a binary dump, a
// progress bar without newlines): memory stays bounded.
constexpr std::size_t k_max_partial = 64 * 1024;
}  // namespace

Capture::Capture(UniqueFd dir, const std::string& name, std::string shown, std::uint64_t max_bytes)
    : m_shown(shown), m_file(dir.get(), name, std::move(shown), max_bytes), m_dir(std::move(dir)) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    throw Error(Exit::failure, "pipe2 failed: " + errno_text(errno));
  }
  m_read.reset(p[0]);
  m_write.reset(p[1]);
  ::fcntl(m_read.get(), F_SETFL, O_NONBLOCK);
  // A larger buffer than 64 KiB: handlers block on a full pipe only if this
  // thread stalls for a long while. Best effort, and modest: pipe buffers
  // count against a per-user limit (fs.pipe-user-pages-soft, 64 MiB) that
  // the handlers' own pipes share when many ranks run on one node.
  ::fcntl(m_write.get(), F_SETPIPE_SZ, 256 << 10);
  m_wake.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!m_wake) {
    throw Error(Exit::failure, "eventfd failed: " + errno_text(errno));
  }
  m_thread = std::thread([this] { run(); });
}

Capture::~Capture() { close(); }

void Capture::wake() {
  std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(m_wake.get(), &one, sizeof one);
}

void Capture::sync(std::chrono::milliseconds limit) {
  std::unique_lock lock(m_mu);
  if (!m_thread.joinable()) {
    return;
  }
  auto want = ++m_sync_asked;
  wake();
  m_cv.wait_for(lock, limit, [&] { return m_sync_done >= want || m_closing; });
}

std::vector<std::string> Capture::tail() const {
  std::lock_guard lock(m_mu);
  return {m_tail.begin(), m_tail.end()};
}

void Capture::close() {
  {
    std::lock_guard lock(m_mu);
    if (!m_thread.joinable() || m_closing) {
      return;
    }
    m_closing = true;
  }
  wake();
  m_thread.join();
  m_write.reset();
}

void Capture::feed(const char* data, std::size_t n) {
  m_partial.append(data, n);
  auto last = m_partial.rfind('\n');
  if (last == std::string::npos) {
    if (m_partial.size() > k_max_partial) {
      flush_partial();
    }
    return;
  }
  std::string_view whole(m_partial.data(), last + 1);
  if (!m_file.append(whole) && !m_warned) {
    m_warned = true;
    spdlog::warn("handler output is being lost: {}", m_file.error());
  }
  {
    std::lock_guard lock(m_mu);
    std::size_t pos = 0;
    while (pos < whole.size()) {
      auto nl = whole.find('\n', pos);
      m_tail.emplace_back(whole.substr(pos, std::min<std::size_t>(nl - pos, 1000)));
      pos = nl + 1;
      if (m_tail.size() > k_tail) {
        m_tail.pop_front();
      }
    }
  }
  m_partial.erase(0, last + 1);
}

void Capture::flush_partial() {
  if (!m_partial.empty()) {
    m_partial += '\n';
    feed("", 0);
  }
}

bool Capture::read_available() {
  char buf[65536];
  while (true) {
    ssize_t n = ::read(m_read.get(), buf, sizeof buf);
    if (n > 0) {
      feed(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    return n < 0;  // EAGAIN: drained for now; 0: EOF
  }
}

void Capture::run() {
  bool open = true;
  while (true) {
    pollfd fds[2] = {{m_read.get(), POLLIN, 0}, {m_wake.get(), POLLIN, 0}};
    // After EOF (every writer gone, ours included) only the wake-up counts.
    int n = open ? ::poll(fds, 2, -1) : ::poll(&fds[1], 1, -1);
    if (n < 0 && errno != EINTR) {
      break;
    }
    if (open) {
      open = read_available();
    }
    std::uint64_t ignored;
    [[maybe_unused]] auto r = ::read(m_wake.get(), &ignored, sizeof ignored);
    std::lock_guard lock(m_mu);
    m_sync_done = m_sync_asked;
    m_cv.notify_all();
    if (m_closing) {
      break;
    }
  }
  flush_partial();
}

}  // namespace lhpc::logs
