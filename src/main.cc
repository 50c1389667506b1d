// lithops-hpc: forwards to the CLI; the one place errors become messages and
// exit codes, and the one place the process is hardened before it reads a
// configuration or environment that may hold the broker's password.
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <exception>
#include <string>

#include "cli/cli.h"
#include "util/error.h"
#include "util/log.h"

namespace {

// lithops-hpc runs engines, scripts and the user's functions with the
// credentials it runs with: set-uid or set-gid it would hand those to every
// local user (and the dynamic loader's secure mode would not cover it all).
void refuse_set_id() {
  uid_t ruid = ::getuid();
  uid_t euid = ::geteuid();
  gid_t rgid = ::getgid();
  gid_t egid = ::getegid();
  if (ruid == euid && rgid == egid) {
    return;
  }
  throw lhpc::Error(lhpc::Exit::failure,
                    "lithops-hpc runs set-uid or set-gid (real uid " + std::to_string(ruid) + ", effective uid " +
                        std::to_string(euid) + "; real gid " + std::to_string(rgid) + ", effective gid " +
                        std::to_string(egid) + "): refusing to run",
                    "never install it set-uid/set-gid: chmod u-s,g-s on the installed binary (see SECURITY in "
                    "lithops-hpc(1))");
}

// Done for every command, first thing, rather than only in those that read
// the broker URL (deploy, worker, ping, config check, ...): most of them do,
// the list would drift, and no command needs to be dumpable. Not dumpable: no
// core file holds the password, and other processes of this user cannot
// ptrace us or read /proc/PID/{environ,mem}. Children are dumpable again
// after their execve: the URL reaches them only through their own environment.
void not_dumpable() {
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    throw lhpc::Error(lhpc::Exit::failure, "prctl(PR_SET_DUMPABLE, 0): " + lhpc::errno_text(errno),
                      "this kernel refuses to protect the process; report it");
  }
  // The same ptrace check guards process_vm_readv, which Open MPI's shared
  // memory transport (vader, CMA) uses between ranks on one host: there a
  // non-root rank's single copy fails ("Read -1, expected N, errno = 1") and
  // Open MPI falls back to copying through shared memory. Forcing that
  // fallback (single_copy_mechanism=none) was tried and left a stage whose
  // peer died hanging past its stall deadline, so it is not forced here.
}

}  // namespace

int main(int argc, char** argv) {
  // Once for the process: a handler or broker peer that goes away while we
  // write to it is an EPIPE to handle where it happens, never a silent death.
  ::signal(SIGPIPE, SIG_IGN);
  try {
    lhpc::setup_logging("info");  // to stderr, with our pattern, before anything can fail
    refuse_set_id();
    not_dumpable();
    return static_cast<int>(lhpc::cli::run(argc, argv));
  } catch (const lhpc::Error& e) {
    spdlog::error("{}", e.what());
    if (!e.hint().empty()) {
      spdlog::error("hint: {}", e.hint());
    }
    return static_cast<int>(e.code());
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return static_cast<int>(lhpc::Exit::failure);
  }
}
