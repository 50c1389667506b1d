// The project's error type and exit codes: a command returns an Exit or
// throws an Error, and one place turns either into a message and a number
// (main.cc; MpiSession::abort for a job that cannot return to main).
// tools/exit-codes.sh (the lint/exit-codes test) keeps it so. Fatal errors
// throw lhpc::Error; absence that is normal is std::optional, never an exception.
#pragma once

#include <stdexcept>
#include <string>

namespace lhpc {

// Documented in man/lithops-hpc.1.scd (EXIT STATUS). Scripts test these.
enum class Exit : int {
  ok = 0,
  failure = 1,        // generic runtime failure; `status`: some rank degraded
  usage = 2,          // bad command line
  config = 3,         // configuration file or value invalid
  image = 4,          // not a SIF file, truncated, corrupt, hash mismatch
  broker = 5,         // broker unreachable or refused login
  engine = 6,         // container engine missing or an instance failed
  stage = 7,          // image transfer failed on some node
  no_deployment = 8,  // `status`, `stop`: no status file where one was looked for
  hangup = 129,       // SIGHUP (`runtime build`)
  interrupted = 130,  // SIGINT
  terminated = 143,   // SIGTERM
};

class Error : public std::runtime_error {
public:
  // what: what went wrong and where; hint: what to do about it (may be empty).
  Error(Exit code, std::string what, std::string hint = {})
      : std::runtime_error(std::move(what)), m_code(code), m_hint(std::move(hint)) {}
  Exit code() const noexcept { return m_code; }
  const std::string& hint() const noexcept { return m_hint; }

private:
  Exit m_code;
  std::string m_hint;
};

// errno as text, for messages that name a system call's failure.
std::string errno_text(int err);

}  // namespace lhpc
