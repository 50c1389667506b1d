#include "util/signals.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "util/error.h"

namespace lhpc {

namespace {
int g_pipe[2] = {-1, -1};
volatile sig_atomic_t g_last_term = 0;

void on_signal(int sig) {
  int saved = errno;
  if (sig == SIGINT || sig == SIGTERM) {
    g_last_term = sig;
  }
  unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = ::write(g_pipe[1], &b, 1);
  errno = saved;
}
}  // namespace

SignalPipe::SignalPipe(std::initializer_list<int> signals) : m_signals(signals) {
  if (g_pipe[0] < 0 && ::pipe2(g_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw Error(Exit::failure, "pipe2 failed: " + errno_text(errno));
  }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int s : m_signals) {
    ::sigaction(s, &sa, nullptr);
  }
}

SignalPipe::~SignalPipe() {
  for (int s : m_signals) {
    ::signal(s, SIG_DFL);
  }
}

int SignalPipe::fd() const noexcept { return g_pipe[0]; }

std::vector<int> SignalPipe::drain() {
  std::vector<int> out;
  unsigned char buf[64];
  while (true) {
    ssize_t n = ::read(g_pipe[0], buf, sizeof buf);
    if (n <= 0) {
      break;
    }
    for (ssize_t i = 0; i < n; ++i) {
      out.push_back(buf[i]);
    }
  }
  return out;
}

int SignalPipe::last_terminating() { return g_last_term; }

Exit exit_for_signal(int sig) {
  switch (sig) {
    case SIGHUP: return Exit::hangup;
    case SIGINT: return Exit::interrupted;
    case SIGTERM: return Exit::terminated;
    default: return Exit::failure;
  }
}

}  // namespace lhpc
