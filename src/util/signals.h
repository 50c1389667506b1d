// Signals through the self-pipe trick: the handler only writes the signal
// number to a pipe; the event loop polls the read end. MPI's own threads may
// receive a signal too; the pipe makes that harmless.
#pragma once

#include <initializer_list>
#include <vector>

#include "util/error.h"

namespace lhpc {

class SignalPipe {
public:
  // Installs handlers for `signals` (SA_RESTART); one instance per process.
  explicit SignalPipe(std::initializer_list<int> signals);
  ~SignalPipe();
  SignalPipe(const SignalPipe&) = delete;
  SignalPipe& operator=(const SignalPipe&) = delete;

  int fd() const noexcept;        // poll for POLLIN
  std::vector<int> drain();       // signals received since the last call
  static int last_terminating();  // last SIGINT/SIGTERM seen (0: none); async-safe read

private:
  std::vector<int> m_signals;
};

// How a run ended by `sig` exits: interrupted (SIGINT), terminated (SIGTERM),
// hangup (SIGHUP); no other signal is caught, and any other is a failure.
Exit exit_for_signal(int sig);

}  // namespace lhpc
