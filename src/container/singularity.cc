// SingularityCE and Apptainer: one CLI family, told apart by the program's
// name, the environment prefix it turns into container variables
// (SINGULARITYENV_ / APPTAINERENV_) and the per-user directory it logs
// instances to. Command lines follow the real tools' synopses
// (`apptainer instance start [start options...] <image> <name>`, ...).
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <nlohmann/json.hpp>
#include <regex>
#include <spdlog/spdlog.h>
#include <thread>

#include "container/engine.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/strings.h"

namespace lhpc::container {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Starting an instance mounts the image, which can take a while on a busy
// parallel file system; a start that has not answered in minutes never will.
constexpr milliseconds k_start_timeout = std::chrono::minutes(5);
constexpr milliseconds k_list_timeout = std::chrono::seconds(60);
// After `instance stop --force` (SIGKILL) the instance goes within moments.
constexpr milliseconds k_force_grace = std::chrono::seconds(10);
constexpr milliseconds k_poll_interval = std::chrono::milliseconds(200);
// Enough of the engine's stderr for its FATAL line and the context before it.
constexpr std::size_t k_tail_bytes = 2000;

struct EngineRun {
  int status = 0;
  bool timed_out = false;
  std::string out;
  std::string err_tail;
  bool ok() const { return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == 0; }
  std::string describe() const {
    return timed_out ? "did not finish in time and was killed" : describe_status(status);
  }
};

std::string tail_of(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
    return {};
  }
  auto size = static_cast<std::size_t>(st.st_size);
  std::size_t off = size > k_tail_bytes ? size - k_tail_bytes : 0;
  std::string buf(size - off, '\0');
  ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(off));
  if (n <= 0) {
    return {};
  }
  buf.resize(static_cast<std::size_t>(n));
  if (off > 0) {
    // Start at a line boundary: half a line is harder to read than none.
    auto nl = buf.find('\n');
    if (nl != std::string::npos) {
      buf.erase(0, nl + 1);
    }
  }
  return trim(buf);
}

// Runs one engine command: stdout through a pipe, stderr into an anonymous
// file. Draining one pipe while the other fills would deadlock, and a file
// never fills. The engine's daemons may keep stdout open after the command
// itself exited, so the loop ends when the command exits, not at EOF.
EngineRun run_engine(const std::vector<std::string>& argv, milliseconds timeout) {
  spdlog::debug("running {}", join_argv(argv));
  UniqueFd err(::memfd_create("lhpc-engine-stderr", MFD_CLOEXEC));
  if (!err) {
    throw Error(Exit::failure, "memfd_create failed: " + errno_text(errno));
  }
  Child child = spawn({.argv = argv, .pipe_stdout = true, .stderr_fd = err.get()});
  EngineRun r;
  auto deadline = Clock::now() + timeout;
  char buf[8192];
  bool eof = false;
  while (true) {
    bool exited = child.try_wait();
    bool drained = eof;
    if (!eof) {
      pollfd p{child.out().get(), POLLIN, 0};
      // Once it exited, only take what is already there.
      int rc = ::poll(&p, 1, exited ? 0 : 50);
      if (rc > 0) {
        ssize_t n = ::read(child.out().get(), buf, sizeof buf);
        if (n > 0) {
          r.out.append(buf, static_cast<std::size_t>(n));
        } else if (n == 0 || errno != EINTR) {
          eof = true;
        }
      } else {
        drained = rc == 0;
      }
    } else if (!exited) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (exited && drained) {
      break;
    }
    if (Clock::now() >= deadline) {
      r.timed_out = true;
      child.terminate(std::chrono::seconds(2));
      break;
    }
  }
  r.status = child.wait();
  r.err_tail = tail_of(err.get());
  return r;
}

std::string with_tail(std::string what, const EngineRun& r) {
  if (!r.err_tail.empty()) {
    what += ":\n" + r.err_tail;
  }
  return what;
}

const std::regex k_instance_name_re("^[a-zA-Z0-9._-]+$");

void check_instance_name(const std::string& name) {
  if (!std::regex_match(name, k_instance_name_re) || name.front() == '-') {
    throw Error(Exit::config, "invalid instance name '" + name + "'",
                "singularity.instance_name may hold only letters, digits, '.', '_' and '-', and not start with '-'");
  }
}

// A path the engine must take as the image, never as a flag.
std::string positional_path(const std::string& p) { return !p.empty() && p.front() == '-' ? "./" + p : p; }

class SingularityEngine final : public Engine {
public:
  explicit SingularityEngine(config::Engine kind)
      : m_kind(kind),
        m_name(kind == config::Engine::apptainer ? "apptainer" : "singularity"),
        m_env_prefix(kind == config::Engine::apptainer ? "APPTAINERENV_" : "SINGULARITYENV_"),
        m_user_dir(kind == config::Engine::apptainer ? ".apptainer" : ".singularity") {}

  config::Engine kind() const override { return m_kind; }
  std::string name() const override { return m_name; }

  std::string binary() const override {
    if (auto p = find_in_path(m_name)) {
      return *p;
    }
    std::string other = m_kind == config::Engine::apptainer ? "singularity" : "apptainer";
    throw Error(Exit::engine, m_name + " not found in PATH",
                "load it (module load " + m_name + ") or set singularity.engine = \"" + other + "\" / \"host\"");
  }

  std::vector<std::string> build_argv(const std::string& out_sif, const std::string& def, bool fakeroot,
                                      bool force) const override {
    std::vector<std::string> argv{m_name, "build"};
    if (fakeroot) {
      argv.push_back("--fakeroot");
    }
    if (force) {
      argv.push_back("--force");
    }
    argv.push_back(positional_path(out_sif));
    argv.push_back(positional_path(def));
    return argv;
  }

  std::vector<std::string> instance_start_argv(const InstanceSpec& spec) const override {
    check_instance_name(spec.name);
    std::vector<std::string> argv{m_name, "instance", "start"};
    if (spec.fakeroot) {
      argv.push_back("--fakeroot");
    }
    if (spec.nv) {
      argv.push_back("--nv");
    }
    for (const auto& b : spec.binds) {
      argv.push_back("--bind");
      argv.push_back(b);
    }
    argv.push_back(positional_path(spec.image));
    argv.push_back(spec.name);
    return argv;
  }

  std::vector<std::string> instance_stop_argv(const std::string& name, bool force) const override {
    check_instance_name(name);
    std::vector<std::string> argv{m_name, "instance", "stop"};
    if (force) {
      argv.push_back("--force");
    }
    argv.push_back(name);
    return argv;
  }

  std::vector<std::string> instance_list_argv(const std::string& name) const override {
    check_instance_name(name);
    return {m_name, "instance", "list", "--json", name};
  }

  std::vector<std::string> exec_argv(const std::string& instance,
                                     const std::vector<std::string>& cmd) const override {
    check_instance_name(instance);
    if (cmd.empty()) {
      throw Error(Exit::failure, "exec in instance " + instance + ": empty command");
    }
    std::vector<std::string> argv{m_name, "exec", "instance://" + instance};
    argv.insert(argv.end(), cmd.begin(), cmd.end());
    return argv;
  }

  std::vector<std::string> run_argv(const std::string& instance) const override {
    check_instance_name(instance);
    return {m_name, "run", "instance://" + instance};
  }

  Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const override {
    Env env = base;
    for (const auto& [key, value] : vars) {
      env.unset(key);
      // A stale copy under the other family's prefix must not compete with
      // ours (Apptainer still reads SINGULARITYENV_ when APPTAINERENV_ is unset).
      env.unset("SINGULARITYENV_" + key);
      env.unset("APPTAINERENV_" + key);
      env.set(m_env_prefix + key, value);
    }
    return env;
  }

  void start_instance(const InstanceSpec& spec) override {
    auto argv = instance_start_argv(spec);
    argv[0] = binary();
    auto r = run_engine(argv, k_start_timeout);
    if (!r.ok()) {
      throw Error(Exit::engine,
                  with_tail(m_name + " instance start failed for " + spec.name + " (" + r.describe() + ")", r),
                  "check the image and the binds on this node; to see the engine's own account, run: " +
                      join_argv(instance_start_argv(spec)));
    }
    if (!listed(spec.name)) {
      throw Error(Exit::engine,
                  m_name + " instance start reported success for " + spec.name + " but `" + m_name +
                      " instance list` does not show it: it exited right after starting",
                  "its log is ~/" + m_user_dir + "/instances/logs/<host>/<user>/" + spec.name +
                      ".err; if the instance does run, this " + m_name +
                      " loses track of it (older Apptainer releases did with --fakeroot, apptainer/apptainer#2189): "
                      "upgrade it or set singularity.fakeroot = false");
    }
    spdlog::debug("{} instance {} started from {}", m_name, spec.name, spec.image);
  }

  bool instance_alive(const std::string& name) override { return listed(name); }

  void stop_instance(const std::string& name, milliseconds timeout) override {
    auto deadline = Clock::now() + timeout;
    auto argv = instance_stop_argv(name, false);
    argv[0] = binary();
    auto r = run_engine(argv, timeout);
    if (!r.ok()) {
      // "no instance found" is the usual reason: already gone is stopped.
      spdlog::debug("{} instance stop {}: {}", m_name, name, with_tail(r.describe(), r));
    }
    while (true) {
      if (!listed(name)) {
        return;
      }
      if (Clock::now() >= deadline) {
        break;
      }
      std::this_thread::sleep_for(k_poll_interval);
    }
    spdlog::warn("{} instance {} did not stop within {} ms: forcing it (SIGKILL)", m_name, name, timeout.count());
    argv = instance_stop_argv(name, true);
    argv[0] = binary();
    auto f = run_engine(argv, k_force_grace);
    auto force_deadline = Clock::now() + k_force_grace;
    while (listed(name)) {
      if (Clock::now() >= force_deadline) {
        throw Error(Exit::engine,
                    with_tail(m_name + " instance " + name + " is still running after `instance stop --force` (" +
                                  f.describe() + ")",
                              f),
                    "stop it by hand: " + join_argv(instance_stop_argv(name, true)));
      }
      std::this_thread::sleep_for(k_poll_interval);
    }
  }

private:
  // `instance list --json NAME`: {"instances": [{"instance": NAME, "pid": ...,
  // "img": ..., "ip": ..., "logErrPath": ..., "logOutPath": ...}]}. NAME is a
  // glob to the engine; ours hold no glob characters, and the exact match
  // below keeps "a" from answering for "a1".
  bool listed(const std::string& name) {
    auto argv = instance_list_argv(name);
    argv[0] = binary();
    auto r = run_engine(argv, k_list_timeout);
    if (!r.ok()) {
      throw Error(Exit::engine, with_tail(m_name + " instance list failed (" + r.describe() + ")", r),
                  "run it by hand to see why: " + join_argv(instance_list_argv(name)));
    }
    if (trim(r.out).empty()) {
      return false;  // some builds print nothing at all when nothing runs
    }
    auto doc = nlohmann::json::parse(r.out, nullptr, false);
    if (doc.is_discarded() || !doc.is_object() || !doc.contains("instances") || !doc["instances"].is_array()) {
      throw Error(Exit::engine,
                  m_name + " instance list --json printed something other than {\"instances\": [...]}: " +
                      trim(r.out.substr(0, 200)),
                  "check that `" + m_name + "` is SingularityCE >= 3.0 or Apptainer >= 1.0 (" + m_name +
                      " --version)");
    }
    for (const auto& i : doc["instances"]) {
      if (i.is_object() && i.value("instance", std::string{}) == name) {
        return true;
      }
    }
    return false;
  }

  config::Engine m_kind;
  std::string m_name;
  std::string m_env_prefix;
  std::string m_user_dir;
};

}  // namespace

namespace detail {
std::unique_ptr<Engine> make_singularity_family(config::Engine kind) {
  return std::make_unique<SingularityEngine>(kind);
}
}  // namespace detail

}  // namespace lhpc::container
