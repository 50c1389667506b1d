// SingularityCE and Apptainer: one CLI family, told apart by the program's
// name, the environment prefix it turns into container variables
// (SINGULARITYENV_ / APPTAINERENV_) and the per-user directory it logs
// instances to. Command lines follow the real tools' synopses
// (`apptainer instance start [start options...] <image> <name>`, ...).
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <algorithm>
#include <cerrno>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "container/engine.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/json_number.h"
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
  std::string describe() const { return timed_out ? "did not finish in time and was killed" : describe_status(status); }
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
EngineRun run_engine(const std::vector<std::string>& argv, milliseconds timeout, const Env& env) {
  spdlog::debug("running {}", join_argv(argv));
  UniqueFd err(::memfd_create("lhpc-engine-stderr", MFD_CLOEXEC));
  if (!err) {
    throw Error(Exit::failure, "memfd_create failed: " + errno_text(errno));
  }
  Child child = spawn({.argv = argv, .env = env, .pipe_stdout = true, .stderr_fd = err.get()});
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

// A loop, not std::regex: libstdc++'s matcher recurses once per character
// and overflows the stack on a long name (a job id is part of it).
bool instance_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

void check_instance_name(const std::string& name) {
  if (name.empty() || name.front() == '-' || !std::all_of(name.begin(), name.end(), instance_name_char)) {
    throw Error(Exit::config, "invalid instance name '" + name + "'",
                "singularity.instance_name may hold only letters, digits, '.', '_' and '-', and not start with '-'");
  }
}

// SingularityCE 4 with `oci mode = yes` in singularity.conf refuses
// `instance start` and `instance stop` with this FATAL line
// (cmd/internal/cli/instance_actions_linux.go, instance_stop_linux.go, 4.5.1).
bool oci_mode_refused(const EngineRun& r) {
  return !r.ok() && r.err_tail.find("not yet supported in OCI-mode") != std::string::npos;
}

// A bind as SRC[:DST[:OPTS]]: a ',' before OPTS or a fourth ':' field means
// a path the engine would split (see check_bind_path()).
void check_bind_spec(const std::string& spec) {
  auto fields = split(spec, ':');
  for (std::size_t i = 0; i < fields.size() && i < 2; ++i) {
    check_bind_path(fields[i], "bind '" + spec + "'");
  }
  if (fields.size() > 3) {
    throw Error(Exit::config, "bind '" + spec + "' has more than SRC:DST:OPTS: a path in it holds ':'",
                "singularity and apptainer split binds on ':'; use paths without ':' (a symbolic link will do)");
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
    add_no_oci(argv);
    if (spec.fakeroot) {
      argv.push_back("--fakeroot");
    }
    argv.insert(argv.end(), spec.gpu.begin(), spec.gpu.end());
    for (const auto& b : spec.binds) {
      check_bind_spec(b);
      argv.push_back("--bind");
      argv.push_back(b);
    }
    argv.push_back(positional_path(spec.image));
    argv.push_back(spec.name);
    return argv;
  }

  std::vector<std::string> instance_stop_argv(const std::string& name, bool force, int timeout_s = 0) const override {
    check_instance_name(name);
    std::vector<std::string> argv{m_name, "instance", "stop"};
    if (force) {
      argv.push_back("--force");
    }
    if (timeout_s > 0) {
      argv.push_back("--timeout");
      argv.push_back(std::to_string(timeout_s));
    }
    argv.push_back(name);
    return argv;
  }

  std::vector<std::string> instance_list_argv(const std::string& name) const override {
    check_instance_name(name);
    return {m_name, "instance", "list", "--json", name};
  }

  std::vector<std::string> exec_argv(const std::string& instance, const std::vector<std::string>& cmd) const override {
    check_instance_name(instance);
    if (cmd.empty()) {
      throw Error(Exit::failure, "exec in instance " + instance + ": empty command");
    }
    std::vector<std::string> argv{m_name, "exec"};
    add_action_flags(argv);
    argv.push_back("instance://" + instance);
    argv.insert(argv.end(), cmd.begin(), cmd.end());
    return argv;
  }

  std::vector<std::string> run_argv(const std::string& instance) const override {
    check_instance_name(instance);
    std::vector<std::string> argv{m_name, "run"};
    add_action_flags(argv);
    argv.push_back("instance://" + instance);
    return argv;
  }

  EngineFeatures features() const override {
    if (!m_features) {
      auto r = run_engine({binary(), "version"}, k_list_timeout, engine_command_env(Env::current()));
      std::string version = r.ok() ? trim(r.out) : std::string{};
      m_features = features_for(m_kind, version);
      if (!m_features->no_eval) {
        spdlog::warn("{} {} has no --no-eval: values passed into the container are escaped instead{}", m_name,
                     version.empty() ? "(version unknown)" : version,
                     r.ok() ? "" : " (`" + m_name + " version` failed: " + r.describe() + ")");
      }
    }
    EngineFeatures f = *m_features;
    f.no_oci = m_no_oci;
    return f;
  }

  void set_version(const std::string& version) override { m_features = features_for(m_kind, version); }

  Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const override {
    Env env = base;
    bool no_eval = features().no_eval;
    for (const auto& [key, value] : vars) {
      env.unset(key);
      // A stale copy under the other family's prefix must not compete with
      // ours (Apptainer still reads SINGULARITYENV_ when APPTAINERENV_ is unset).
      env.unset("SINGULARITYENV_" + key);
      env.unset("APPTAINERENV_" + key);
      // Without --no-eval the engine evaluates the value as the inside of a
      // double-quoted shell word.
      env.set(m_env_prefix + key, no_eval ? value : escape_for_engine_eval(value));
    }
    return env;
  }

  void start_instance(const InstanceSpec& spec) override {
    auto r = run_engine(with_binary(instance_start_argv(spec)), k_start_timeout, engine_command_env(Env::current()));
    if (oci_mode_refused(r) && m_kind == config::Engine::singularity && !m_no_oci) {
      spdlog::warn(
          "{} refuses instances in OCI mode (`oci mode = yes` in singularity.conf): starting {} with "
          "--no-oci, and stopping it by its PID (`instance stop` has no --no-oci)",
          m_name, spec.name);
      m_no_oci = true;
      r = run_engine(with_binary(instance_start_argv(spec)), k_start_timeout, engine_command_env(Env::current()));
    }
    if (oci_mode_refused(r)) {
      throw Error(Exit::engine,
                  with_tail(m_name + " instance start refused " + spec.name + ": instances need the native runtime", r),
                  "ask the site to set `oci mode = no` in singularity.conf, or set singularity.engine = \"apptainer\" "
                  "where it is installed");
    }
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

  bool instance_alive(const std::string& name) override { return listed(name).has_value(); }

  void stop_instance(const std::string& name, milliseconds timeout) override {
    auto deadline = Clock::now() + timeout;
    // The engine's own SIGKILL (--timeout, whole seconds) must come before
    // our deadline, else every stop would end in --force and a warning.
    int engine_timeout_s = std::max<int>(1, static_cast<int>(timeout.count() / 2000));
    request_stop(name, false, engine_timeout_s, timeout);
    if (wait_unlisted(name, deadline)) {
      return;
    }
    spdlog::warn("{} instance {} did not stop within {} ms: forcing it (SIGKILL)", m_name, name, timeout.count());
    auto f = request_stop(name, true, 0, k_force_grace);
    if (!wait_unlisted(name, Clock::now() + k_force_grace)) {
      throw Error(Exit::engine,
                  with_tail(m_name + " instance " + name + " is still running after `instance stop --force` (" +
                                f.describe() + ")",
                            f),
                  "stop it by hand: " + join_argv(instance_stop_argv(name, true)));
    }
  }

private:
  std::vector<std::string> with_binary(std::vector<std::string> argv) const {
    argv[0] = binary();
    return argv;
  }

  void add_no_oci(std::vector<std::string>& argv) const {
    if (m_no_oci) {
      argv.push_back("--no-oci");
    }
  }

  // Flags of exec and run into the instance.
  void add_action_flags(std::vector<std::string>& argv) const {
    add_no_oci(argv);
    if (features().no_eval) {
      argv.push_back("--no-eval");
    }
  }

  // `instance stop` (or, in SingularityCE's OCI mode, where it is refused
  // whatever the flags, what it would do: the signal to the instance's PID,
  // SIGINT or SIGKILL as cmd/internal/cli/instance_stop_linux.go).
  EngineRun request_stop(const std::string& name, bool force, int timeout_s, milliseconds bound) {
    EngineRun r;
    if (!m_no_oci) {
      r = run_engine(with_binary(instance_stop_argv(name, force, timeout_s)), bound,
                     engine_command_env(Env::current()));
      if (!oci_mode_refused(r)) {
        if (!r.ok()) {
          // "no instance found" is the usual reason: already gone is stopped.
          spdlog::debug("{} instance stop {}: {}", m_name, name, with_tail(r.describe(), r));
        }
        return r;
      }
      spdlog::warn(
          "{} refuses `instance stop` in OCI mode (`oci mode = yes` in singularity.conf): signalling "
          "instance {} by its PID",
          m_name, name);
      m_no_oci = true;
    }
    if (auto pid = listed(name); pid && *pid > 0) {
      ::kill(static_cast<pid_t>(*pid), force ? SIGKILL : SIGINT);
    }
    return r;
  }

  bool wait_unlisted(const std::string& name, Clock::time_point deadline) {
    while (listed(name)) {
      if (Clock::now() >= deadline) {
        return false;
      }
      std::this_thread::sleep_for(k_poll_interval);
    }
    return true;
  }

  // `instance list --json NAME`: {"instances": [{"instance": NAME, "pid": ...,
  // "img": ..., "ip": ..., "logErrPath": ..., "logOutPath": ...}]}. NAME is a
  // glob to the engine; ours hold no glob characters, and the exact match
  // below keeps "a" from answering for "a1". The instance's PID, or nullopt
  // when it is not listed.
  std::optional<long long> listed(const std::string& name) {
    auto r = run_engine(with_binary(instance_list_argv(name)), k_list_timeout, engine_command_env(Env::current()));
    if (!r.ok()) {
      throw Error(Exit::engine, with_tail(m_name + " instance list failed (" + r.describe() + ")", r),
                  "run it by hand to see why: " + join_argv(instance_list_argv(name)));
    }
    if (trim(r.out).empty()) {
      return std::nullopt;  // some builds print nothing at all when nothing runs
    }
    auto doc = nlohmann::json::parse(r.out, nullptr, false);
    if (doc.is_discarded() || !doc.is_object() || !doc.contains("instances") || !doc["instances"].is_array()) {
      throw Error(Exit::engine,
                  m_name + " instance list --json printed something other than {\"instances\": [...]}: " +
                      trim(r.out.substr(0, 200)),
                  "check that `" + m_name + "` is SingularityCE >= 3.0 or Apptainer >= 1.0 (" + m_name + " --version)");
    }
    for (const auto& i : doc["instances"]) {
      if (i.is_object() && i.value("instance", std::string{}) == name) {
        const auto& pid = i.contains("pid") ? i["pid"] : nlohmann::json();
        return json_integer<long long>(pid).value_or(0);
      }
    }
    return std::nullopt;
  }

  config::Engine m_kind;
  std::string m_name;
  std::string m_env_prefix;
  std::string m_user_dir;
  mutable std::optional<EngineFeatures> m_features;
  bool m_no_oci = false;
};

}  // namespace

namespace detail {
std::unique_ptr<Engine> make_singularity_family(config::Engine kind) {
  return std::make_unique<SingularityEngine>(kind);
}
}  // namespace detail

}  // namespace lhpc::container
