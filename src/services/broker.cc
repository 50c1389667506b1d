#include "services/broker.h"

#include <fcntl.h>
#include <signal.h>

#include <cstdlib>

#include "lhpc_build_config.h"
#include "lhpc_source_root.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/strings.h"

namespace lhpc::services {

namespace {

std::string tail_of(const std::string& path, std::size_t bytes) {
  try {
    auto text = read_file(path);
    return text.substr(text.size() > bytes ? text.size() - bytes : 0);
  } catch (const Error&) {
    return "";
  }
}

// The script with its messages appended to `log`; returns the wait status.
int run_script(const std::vector<std::string>& args, const std::string& log) {
  UniqueFd out(::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!out) {
    throw Error(Exit::failure, "cannot write " + log);
  }
  SpawnOptions o;
  o.argv = {broker_script()};
  o.argv.insert(o.argv.end(), args.begin(), args.end());
  o.stdout_fd = out.get();
  o.stderr_fd = out.get();
  auto c = spawn(o);
  return c.wait();
}

}  // namespace

std::string broker_script() {
  for (const std::string& dir : {std::string(LHPC_DATADIR), std::string(LHPC_SOURCE_ROOT)}) {
    auto p = dir + "/deploy/rabbitmq-user-broker.sh";
    if (path_exists(p)) {
      return p;
    }
  }
  throw Error(Exit::failure, "rabbitmq-user-broker.sh not found under " + std::string(LHPC_DATADIR) + "/deploy",
              "reinstall lithops-hpc (meson install puts it there)");
}

std::optional<std::string> find_rabbitmq() {
  if (const char* s = std::getenv("RABBITMQ_SBIN"); s && *s) {
    auto p = std::string(s) + "/rabbitmq-server";
    return path_exists(p) ? std::optional<std::string>(p) : std::nullopt;
  }
  for (const char* d : {"/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin"}) {
    if (path_exists(std::string(d) + "/rabbitmq-server")) {
      return std::string(d) + "/rabbitmq-server";
    }
  }
  return find_in_path("rabbitmq-server");
}

std::string start_broker(const BrokerStart& b) {
  std::vector<std::string> args = {"start", "--dir", b.dir, "--consumer-timeout", "off"};
  if (!b.bind.empty()) {
    args.insert(args.end(), {"--bind", b.bind});
  }
  if (!b.tls_cert.empty()) {
    args.insert(args.end(), {"--tls-cert", b.tls_cert, "--tls-key", b.tls_key});
    if (!b.tls_ca.empty()) {
      args.insert(args.end(), {"--tls-ca", b.tls_ca});
    }
  }
  int st = run_script(args, b.log);
  auto url = broker_url(b.dir);
  if (status_exit_code(st) != 0 || !url) {
    throw Error(Exit::failure,
                "the RabbitMQ broker did not start (" + describe_status(st) + "); " + b.log + " ends with:\n" +
                    tail_of(b.log, 1500),
                "its own log is in " + b.dir + "/log; fix what they say, then run lithops-hpc up again");
  }
  return *url;
}

void stop_broker(const std::string& dir, const std::string& log) {
  if (!path_exists(dir + "/run")) {
    return;
  }
  int st = run_script({"stop", "--dir", dir}, log);
  if (status_exit_code(st) != 0) {
    throw Error(Exit::failure, "the broker in " + dir + " did not stop (" + describe_status(st) + ")",
                "see " + log + " and " + dir + "/log");
  }
}

bool broker_running(const std::string& dir) {
  try {
    long pid = std::strtol(trim(read_file(dir + "/run/server.pid")).c_str(), nullptr, 10);
    return pid > 0 && ::kill(static_cast<pid_t>(pid), 0) == 0;
  } catch (const Error&) {
    return false;
  }
}

std::optional<std::string> broker_url(const std::string& dir) {
  auto text = read_private_file(dir + "/amqp_url", 4096);
  if (!text || trim(*text).empty()) {
    return std::nullopt;
  }
  return trim(*text);
}

}  // namespace lhpc::services
