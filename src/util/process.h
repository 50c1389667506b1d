// Child processes: spawn with pipes and an explicit environment, signal,
// reap. Secrets travel in the environment, never in argv (see docs/design.md, "Security").
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/fd.h"

namespace lhpc {

// An environment to hand to a child: starts as a copy of ours.
class Env {
public:
  static Env current();
  static Env empty() { return Env{}; }
  void set(const std::string& key, const std::string& value) { m_vars[key] = value; }
  void unset(const std::string& key) { m_vars.erase(key); }
  std::optional<std::string> get(const std::string& key) const;
  std::vector<std::string> to_vector() const;  // "KEY=VALUE" entries
  const std::map<std::string, std::string>& vars() const { return m_vars; }

private:
  std::map<std::string, std::string> m_vars;
};

struct SpawnOptions {
  std::vector<std::string> argv;   // argv[0] is looked up in PATH when it has no '/'
  std::optional<Env> env;          // nullopt: inherit ours
  bool pipe_stdin = false;         // Child::in() writes to the child's stdin
  bool pipe_stdout = false;        // Child::out() reads the child's stdout
  int stdin_fd = -1;               // else redirect from this fd (-1: /dev/null)
  int stdout_fd = -1;              // else redirect to this fd (-1: inherit)
  int stderr_fd = -1;              // -1: inherit
  bool new_process_group = false;  // so a signal to the group reaches grandchildren
  bool new_session = false;        // setsid: a daemon that outlives us and our terminal
  std::string cwd;                 // empty: ours
};

class Child {
public:
  Child() = default;
  Child(Child&&) noexcept;
  Child& operator=(Child&&) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  // A child still running when its handle dies is killed (SIGKILL) and reaped.
  ~Child();

  pid_t pid() const noexcept { return m_pid; }
  bool running() const noexcept { return m_pid > 0 && !m_status; }
  UniqueFd& in() noexcept { return m_in; }
  UniqueFd& out() noexcept { return m_out; }

  // Non-blocking reap: true once the child has exited (status then set).
  bool try_wait();
  // Blocking reap; returns the raw wait status.
  int wait();
  // Waits up to `timeout`; true if it exited.
  bool wait_for(std::chrono::milliseconds timeout);
  void signal(int sig) const;  // to the process group when spawned with one
  // SIGTERM, then SIGKILL after `grace`; always reaps.
  void terminate(std::chrono::milliseconds grace);
  std::optional<int> status() const { return m_status; }
  // Lets the child outlive this handle (a daemon): returns its pid and
  // forgets it; init reaps it once we are gone.
  pid_t release() noexcept;

private:
  friend Child spawn(const SpawnOptions&);
  void release_handles();
  pid_t m_pid = -1;
  bool m_group = false;
  std::optional<int> m_status;
  UniqueFd m_in, m_out;
};

// Throws lhpc::Error (Exit::failure) when the program cannot be started.
Child spawn(const SpawnOptions& opts);

struct RunResult {
  int status = 0;   // raw wait status
  std::string out;  // captured stdout
  bool ok() const;
  int exit_code() const;  // exit code, or 128+signal
};
// Runs to completion capturing stdout (stderr inherited unless stderr_fd set).
RunResult run_capture(SpawnOptions opts);
// The same within `limit`: nullopt when the program has not exited by then
// (it is killed and reaped).
std::optional<RunResult> run_capture_within(SpawnOptions opts, std::chrono::milliseconds limit);

// "exited with code 3", "killed by signal 9 (Killed)".
std::string describe_status(int status);
// Exit code a shell would report: code, or 128+signal.
int status_exit_code(int status);

std::optional<std::string> find_in_path(const std::string& name);

// A pid read from a file names our process only while that process runs as
// this user and its command line still holds `word` ("redis-server"): a pid
// is reused, and a file may name anyone's. Checked before it is signalled.
bool own_process_with(pid_t pid, std::string_view word);

// The file-creation mask for what is spawned while this lives (children
// inherit it): a daemon's pid and log files are then not writable by others
// whatever the user's umask. For a command's own thread only: the mask is the
// process's.
class ScopedUmask {
public:
  explicit ScopedUmask(mode_t mask) : m_old(::umask(mask)) {}
  ~ScopedUmask() { ::umask(m_old); }
  ScopedUmask(const ScopedUmask&) = delete;
  ScopedUmask& operator=(const ScopedUmask&) = delete;

private:
  mode_t m_old;
};

}  // namespace lhpc
