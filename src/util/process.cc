#include "util/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "util/error.h"
#include "util/fs.h"
#include "util/strings.h"

extern char** environ;

namespace lhpc {

Env Env::current() {
  Env e;
  for (char** p = environ; p && *p; ++p) {
    std::string_view kv(*p);
    auto eq = kv.find('=');
    if (eq != std::string_view::npos) {
      e.m_vars[std::string(kv.substr(0, eq))] = std::string(kv.substr(eq + 1));
    }
  }
  return e;
}

std::optional<std::string> Env::get(const std::string& key) const {
  auto it = m_vars.find(key);
  if (it == m_vars.end()) {
    return std::nullopt;
  }
  return it->second;
}

std::vector<std::string> Env::to_vector() const {
  std::vector<std::string> out;
  out.reserve(m_vars.size());
  for (const auto& [k, v] : m_vars) {
    out.push_back(k + "=" + v);
  }
  return out;
}

Child::Child(Child&& o) noexcept
    : m_pid(std::exchange(o.m_pid, -1)),
      m_group(o.m_group),
      m_status(std::exchange(o.m_status, std::nullopt)),
      m_in(std::move(o.m_in)),
      m_out(std::move(o.m_out)) {}

Child& Child::operator=(Child&& o) noexcept {
  if (this != &o) {
    release_handles();
    m_pid = std::exchange(o.m_pid, -1);
    m_group = o.m_group;
    m_status = std::exchange(o.m_status, std::nullopt);
    m_in = std::move(o.m_in);
    m_out = std::move(o.m_out);
  }
  return *this;
}

Child::~Child() { release_handles(); }

pid_t Child::release() noexcept {
  m_in.reset();
  m_out.reset();
  return std::exchange(m_pid, -1);
}

void Child::release_handles() {
  m_in.reset();
  m_out.reset();
  if (running()) {
    signal(SIGKILL);
    wait();
  }
  m_pid = -1;
}

bool Child::try_wait() {
  if (m_status) {
    return true;
  }
  if (m_pid <= 0) {
    return false;
  }
  int st = 0;
  pid_t r = ::waitpid(m_pid, &st, WNOHANG);
  if (r == m_pid) {
    m_status = st;
    return true;
  }
  if (r < 0 && errno == ECHILD) {
    m_status = 0;  // someone else reaped it
    return true;
  }
  return false;
}

int Child::wait() {
  if (m_status) {
    return *m_status;
  }
  int st = 0;
  while (::waitpid(m_pid, &st, 0) < 0) {
    if (errno != EINTR) {
      st = 0;
      break;
    }
  }
  m_status = st;
  return st;
}

bool Child::wait_for(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!try_wait()) {
    if (std::chrono::steady_clock::now() >= deadline) {
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

void Child::signal(int sig) const {
  if (m_pid <= 0 || m_status) {
    return;
  }
  if (m_group) {
    ::kill(-m_pid, sig);
  } else {
    ::kill(m_pid, sig);
  }
}

void Child::terminate(std::chrono::milliseconds grace) {
  if (!running()) {
    return;
  }
  signal(SIGTERM);
  if (!wait_for(grace)) {
    signal(SIGKILL);
    wait();
  }
}

namespace {

struct FileActions {
  posix_spawn_file_actions_t fa;
  FileActions() { posix_spawn_file_actions_init(&fa); }
  ~FileActions() { posix_spawn_file_actions_destroy(&fa); }
};
struct SpawnAttr {
  posix_spawnattr_t attr;
  SpawnAttr() { posix_spawnattr_init(&attr); }
  ~SpawnAttr() { posix_spawnattr_destroy(&attr); }
};

std::pair<UniqueFd, UniqueFd> make_pipe() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    throw Error(Exit::failure, "pipe2 failed: " + errno_text(errno));
  }
  return {UniqueFd(p[0]), UniqueFd(p[1])};
}

}  // namespace

namespace {

std::string program_path(const SpawnOptions& opts) {
  if (opts.argv.empty()) {
    throw Error(Exit::failure, "spawn: empty command line");
  }
  std::string prog = opts.argv[0];
  if (prog.find('/') == std::string::npos) {
    auto found = find_in_path(prog);
    if (!found) {
      throw Error(Exit::failure, "cannot run '" + prog + "': not found in PATH");
    }
    prog = *found;
  }
  return prog;
}

// The parent's ends of the pipes spawn made (empty when not asked for).
struct ParentEnds {
  UniqueFd in_w, out_r;
};

// stdin, stdout, stderr and the working directory of the child. The child's
// pipe ends go into `child_ends`, to be closed once the child has them.
ParentEnds wire_files(FileActions& fa, const SpawnOptions& opts, std::vector<UniqueFd>& child_ends) {
  ParentEnds ends;
  if (opts.pipe_stdin) {
    auto [r, w] = make_pipe();
    posix_spawn_file_actions_adddup2(&fa.fa, r.get(), 0);
    child_ends.push_back(std::move(r));
    ends.in_w = std::move(w);
  } else if (opts.stdin_fd >= 0) {
    posix_spawn_file_actions_adddup2(&fa.fa, opts.stdin_fd, 0);
  } else {
    posix_spawn_file_actions_addopen(&fa.fa, 0, "/dev/null", O_RDONLY, 0);
  }
  if (opts.pipe_stdout) {
    auto [r, w] = make_pipe();
    posix_spawn_file_actions_adddup2(&fa.fa, w.get(), 1);
    child_ends.push_back(std::move(w));
    ends.out_r = std::move(r);
  } else if (opts.stdout_fd >= 0) {
    posix_spawn_file_actions_adddup2(&fa.fa, opts.stdout_fd, 1);
  }
  if (opts.stderr_fd >= 0) {
    posix_spawn_file_actions_adddup2(&fa.fa, opts.stderr_fd, 2);
  }
  if (!opts.cwd.empty()) {
    posix_spawn_file_actions_addchdir_np(&fa.fa, opts.cwd.c_str());
  }
  return ends;
}

// Children start with default dispositions and an empty mask, whatever we
// blocked or caught for our own event loop; in their own session or process
// group when asked.
void set_attributes(SpawnAttr& sa, const SpawnOptions& opts) {
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  posix_spawnattr_setsigmask(&sa.attr, &none);
  posix_spawnattr_setsigdefault(&sa.attr, &all);
  if (opts.new_session) {
    flags |= POSIX_SPAWN_SETSID;
  } else if (opts.new_process_group) {
    flags |= POSIX_SPAWN_SETPGROUP;
    posix_spawnattr_setpgroup(&sa.attr, 0);
  }
  posix_spawnattr_setflags(&sa.attr, flags);
}

}  // namespace

Child spawn(const SpawnOptions& opts) {
  std::string prog = program_path(opts);
  FileActions fa;
  SpawnAttr sa;
  std::vector<UniqueFd> child_ends;
  ParentEnds ends = wire_files(fa, opts, child_ends);
  set_attributes(sa, opts);

  std::vector<char*> argv;
  for (const auto& a : opts.argv) {
    argv.push_back(const_cast<char*>(a.c_str()));
  }
  argv.push_back(nullptr);
  std::vector<std::string> env_storage;
  std::vector<char*> envp;
  char** envpp = environ;
  if (opts.env) {
    env_storage = opts.env->to_vector();
    for (auto& e : env_storage) {
      envp.push_back(e.data());
    }
    envp.push_back(nullptr);
    envpp = envp.data();
  }

  pid_t pid = -1;
  int rc = posix_spawn(&pid, prog.c_str(), &fa.fa, &sa.attr, argv.data(), envpp);
  if (rc != 0) {
    throw Error(Exit::failure, "cannot run '" + prog + "': " + errno_text(rc));
  }
  Child c;
  c.m_pid = pid;
  c.m_group = opts.new_process_group || opts.new_session;
  c.m_in = std::move(ends.in_w);
  c.m_out = std::move(ends.out_r);
  return c;
}

bool RunResult::ok() const { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }
int RunResult::exit_code() const { return status_exit_code(status); }

RunResult run_capture(SpawnOptions opts) {
  opts.pipe_stdout = true;
  Child c = spawn(opts);
  RunResult r;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(c.out().get(), buf, sizeof buf);
    if (n > 0) {
      r.out.append(buf, static_cast<std::size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  r.status = c.wait();
  return r;
}

std::optional<RunResult> run_capture_within(SpawnOptions opts, std::chrono::milliseconds limit) {
  opts.pipe_stdout = true;
  Child c = spawn(opts);
  RunResult r;
  auto deadline = std::chrono::steady_clock::now() + limit;
  auto left = [&] {
    return std::max(std::chrono::milliseconds(0),
                    std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
  };
  char buf[65536];
  while (true) {
    pollfd p{c.out().get(), POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left().count()));
    if (rc == 0) {
      return std::nullopt;  // too slow: the Child handle kills and reaps it
    }
    ssize_t n = rc > 0 ? ::read(c.out().get(), buf, sizeof buf) : -1;
    if (n > 0) {
      r.out.append(buf, static_cast<std::size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  if (!c.wait_for(left())) {
    return std::nullopt;
  }
  r.status = *c.status();
  return r;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) {
    return "exited with code " + std::to_string(WEXITSTATUS(status));
  }
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return "killed by signal " + std::to_string(sig) + (name ? std::string(" (") + name + ")" : "");
  }
  return "ended with status " + std::to_string(status);
}

int status_exit_code(int status) {
  if (WIFEXITED(status)) {
    return WEXITSTATUS(status);
  }
  if (WIFSIGNALED(status)) {
    return 128 + WTERMSIG(status);
  }
  return 1;
}

std::optional<std::string> find_in_path(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    if (::access(name.c_str(), X_OK) == 0) {
      return name;
    }
    return std::nullopt;
  }
  const char* path = ::getenv("PATH");
  for (const auto& dir : split(path ? path : "/usr/local/bin:/usr/bin:/bin", ':')) {
    std::string cand = (dir.empty() ? "." : dir) + "/" + name;
    struct stat st {};
    if (::stat(cand.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(cand.c_str(), X_OK) == 0) {
      return cand;
    }
  }
  return std::nullopt;
}

bool own_process_with(pid_t pid, std::string_view word) {
  if (pid <= 0) {
    return false;
  }
  auto proc = "/proc/" + std::to_string(pid);
  struct stat st {};
  if (::stat(proc.c_str(), &st) != 0 || st.st_uid != ::geteuid()) {
    return false;
  }
  try {
    auto cmd = read_file(proc + "/cmdline");
    return cmd.find(word) != std::string::npos;
  } catch (const Error&) {
    return false;  // gone meanwhile
  }
}

}  // namespace lhpc
