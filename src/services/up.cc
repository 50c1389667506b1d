#include "services/up.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <thread>

#include "amqp/connection.h"
#include "autoalloc/controller.h"
#include "config/config.h"
#include "lhpc_build_config.h"
#include "services/broker.h"
#include "services/lithops_config.h"
#include "services/net.h"
#include "services/record.h"
#include "services/redis.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/strings.h"

namespace lhpc::services {

namespace {

using namespace std::chrono_literals;

// How long up waits for a controller it started to look at the queue once.
constexpr auto k_controller_start = 30s;

constexpr std::uint64_t k_mib = 1024 * 1024;
constexpr const char* k_try_line =
    "python3 -c \"import lithops; print(lithops.FunctionExecutor().call_async(lambda x: x + 1, 1).result())\"";

double unix_now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

// One `up` or `down` at a time per user (the state directory is shared).
UniqueFd lock_services() {
  make_private_dir(services_dir());
  auto path = services_dir() + "/lock";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd) {
    throw Error(Exit::failure, "cannot open " + path + ": " + errno_text(errno));
  }
  auto deadline = std::chrono::steady_clock::now() + 120s;
  while (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      throw Error(Exit::failure, "another lithops-hpc up or down holds " + path,
                  "wait for it to finish, then run this again");
    }
    std::this_thread::sleep_for(100ms);
  }
  return fd;
}

std::uint64_t mem_total() {
  try {
    auto text = read_file("/proc/meminfo");
    auto at = text.find("MemTotal:");
    if (at != std::string::npos) {
      return std::strtoull(text.c_str() + at + 9, nullptr, 10) * 1024;
    }
  } catch (const Error&) {
  }
  return 2048 * k_mib;
}

// The nearest existing directory's file system type.
long fs_type_of(std::string path) {
#if LHPC_TEST_HOOKS
  if (const char* t = std::getenv("LHPC_TEST_FS_TYPE"); t && *t) {
    return std::strtol(t, nullptr, 0);
  }
#endif
  while (!path.empty() && !path_exists(path)) {
    path = dirname_of(path);
  }
  struct statfs st {};
  return ::statfs(path.empty() ? "/" : path.c_str(), &st) == 0 ? static_cast<long>(st.f_type) : 0;
}

bool alive_with(long pid, const char* word) {
  return pid > 0 && pid <= std::numeric_limits<pid_t>::max() && own_process_with(static_cast<pid_t>(pid), word);
}

bool controller_alive(const Record& r) { return alive_with(r.controller_pid, "autoalloc"); }

}  // namespace

std::uint64_t default_storage_memory(std::uint64_t total) {
  return std::clamp<std::uint64_t>(total / 4, 256 * k_mib, 8192 * k_mib);
}

bool is_network_fs(long t) {
  switch (static_cast<unsigned long>(t) & 0xffffffffUL) {
    case 0x6969UL:      // NFS
    case 0x517BUL:      // SMB
    case 0xFF534D42UL:  // CIFS
    case 0xFE534D42UL:  // SMB2
    case 0x0BD00BD0UL:  // Lustre
    case 0x47504653UL:  // GPFS
    case 0x00C36400UL:  // Ceph
    case 0x5346414FUL:  // AFS
      return true;
    default: return false;
  }
}

namespace {

// The record this `up` works from: refused when the services run on another
// host (unless --takeover), the data directory as given, kept or defaulted.
Record prepare_record(const UpOptions& o) {
  auto old = load_record();
  Record r = old.value_or(Record{});
  auto here = this_host();
  if (old && old->running && old->host != here && !o.takeover) {
    throw Error(Exit::failure,
                "your lithops-hpc services already run on " + old->host + " (lithops-hpc up ran there; the record is " +
                    services_dir() + "/services.json)",
                "use them from there, or run `lithops-hpc down` on " + old->host +
                    " first; if that host is gone for good, `lithops-hpc up --takeover` here");
  }
  if (!o.data_dir.empty()) {
    auto given = o.data_dir;
    if (old && old->running && !old->data_dir.empty() && old->data_dir != given && old->host == here) {
      throw Error(Exit::usage, "the services run with their data in " + old->data_dir + ", not " + given,
                  "run `lithops-hpc down` first to move them, or leave --data-dir out");
    }
    r.data_dir = given;
  } else if (r.data_dir.empty()) {
    r.data_dir = services_dir();
  }
  r.host = here;
  return r;
}

// RabbitMQ's data on NFS is a known trap (file locks, fsync, lost
// messages): refused unless the user chose that directory knowingly.
void check_data_dir(const UpOptions& o, const Record& r) {
  if (!is_network_fs(fs_type_of(r.data_dir))) {
    return;
  }
  auto local = "/var/tmp/lithops-hpc-" + user_name();
  if (!o.data_dir.empty()) {
    spdlog::warn("{} is on a network file system: the broker's and the store's data there may be lost or locked",
                 r.data_dir);
    return;
  }
  throw Error(Exit::usage,
              r.data_dir +
                  " is on a network file system (NFS, Lustre, GPFS ...): RabbitMQ's data there is a known "
                  "trap (locks, fsync, messages lost)",
              "give a directory on this host's local disk: lithops-hpc up --data-dir " + local);
}

// Every server needed, looked up before anything starts: one message for all.
std::string check_servers(const UpOptions& o) {
  std::vector<std::string> missing;
  if (o.broker_url.empty() && !find_rabbitmq()) {
    missing.push_back(
        "rabbitmq-server (Debian/Ubuntu: apt install rabbitmq-server; elsewhere set RABBITMQ_SBIN to "
        "its sbin directory), or use your site's broker: --broker-url URL");
  }
  std::string redis;
  if (o.storage == "redis") {
    const char* env = std::getenv("LITHOPS_HPC_REDIS_SERVER");
    auto found = env && *env ? (path_exists(env) ? std::optional<std::string>(env) : std::nullopt)
                             : find_in_path("redis-server");
    if (!found) {
      missing.push_back(
          "redis-server (Debian/Ubuntu: apt install redis-server; or set LITHOPS_HPC_REDIS_SERVER), "
          "or keep a storage your Lithops config has: --storage NAME");
    } else {
      redis = *found;
    }
  }
  if (!missing.empty()) {
    std::string what = "not installed: ";
    for (std::size_t i = 0; i < missing.size(); ++i) {
      what += (i ? "; " : "") + missing[i].substr(0, missing[i].find(' '));
    }
    std::string hint = "install ";
    for (std::size_t i = 0; i < missing.size(); ++i) {
      hint += (i ? "; install " : "") + missing[i];
    }
    throw Error(Exit::usage, what, hint);
  }
  return redis;
}

// The site's broker: a URL without a password, or "-" for one line on stdin
// (a password on a command line is readable by every user of the host).
std::string site_broker_url(const std::string& flag) {
  std::string url = flag;
  if (flag == "-") {
    std::getline(std::cin, url);
    url = trim(url);
  } else if (config::url_has_password(flag)) {
    throw Error(Exit::usage, "--broker-url holds a password: others on this host can read command lines",
                "give it on standard input instead: lithops-hpc up --broker-url - < file-with-the-url");
  }
  config::parse_amqp_url(url);  // throws with the usual words
  return url;
}

}  // namespace

namespace {

struct Started {
  std::vector<std::string> lines;  // what runs, one line each
  std::string url;                 // the broker's (secret)
  std::string redis_host;
  std::string redis_password;  // secret
};

std::string state_word(bool was_running) { return was_running ? "running (left alone)" : "started"; }

void ensure_broker(const UpOptions& o, Record& r, Started& s) {
  if (!o.broker_url.empty()) {
    r.broker_managed = false;
    s.url = site_broker_url(o.broker_url);
    s.lines.push_back("broker      your site's " + config::redact_url(s.url) + " (none started)");
    return;
  }
  r.broker_managed = true;
  auto dir = broker_dir(r);
  bool was = broker_running(dir);
  BrokerStart b{dir, o.bind, o.tls_cert, o.tls_key, o.tls_ca, services_dir() + "/broker-script.log"};
  auto before = broker_url(dir);
  s.url = start_broker(b);
  if (before && *before != s.url) {
    spdlog::warn(
        "the broker's URL changed (its saved port was taken by another program): clients started before "
        "must read the Lithops config again");
  }
  s.lines.push_back(
      fmt::format("broker      {:<22} {}  logs: {}/log", state_word(was), config::redact_url(s.url), dir));
}

// Where the store listens: --bind, else with TLS every interface (as the
// broker), else loopback.
std::string redis_bind(const Record& r) { return !r.bind.empty() || r.tls_cert.empty() ? r.bind : "0.0.0.0"; }

std::string absolute_path(const std::string& p) {
  return p.empty() ? p : std::filesystem::absolute(p).lexically_normal().string();
}

// TLS given to this up replaces what the record kept; none given keeps it.
void take_tls(const UpOptions& o, Record& r) {
  if (!o.tls_cert.empty()) {
    r.tls_cert = absolute_path(o.tls_cert);
    r.tls_key = absolute_path(o.tls_key);
    r.tls_ca = absolute_path(o.tls_ca);
  }
}

// Same port and password as before when it can: the config stays valid.
int redis_port_for(const Record& r, const std::string& bind) {
  auto dir = redis_dir(r);
  if (r.redis_port > 0) {
    if (redis_alive(dir, r.redis_port, bind, r.tls_cert) || port_free(probe_address(bind), r.redis_port)) {
      return r.redis_port;
    }
    spdlog::warn(
        "port {} (the store's until now) is taken by another program: the store moves to a new port and "
        "the Lithops config is updated; clients started before must read it again",
        r.redis_port);
  }
  return free_port(probe_address(bind));
}

void ensure_redis(const UpOptions& o, const std::string& server, Record& r, Started& s) {
  if (o.storage != "redis") {
    r.redis_managed = false;
    r.storage = o.storage;
    s.lines.push_back("storage     " + o.storage + " as your Lithops config sets it up (none started)");
    return;
  }
  r.storage = "redis";
  r.redis_managed = true;
  bool same_bind = o.bind.empty() || o.bind == r.bind;
  if (!o.bind.empty()) {
    r.bind = o.bind;  // kept for later `up`s, as the broker script keeps its own
  }
  auto old_cert = r.tls_cert;
  take_tls(o, r);
  auto bind = redis_bind(r);
  auto dir = redis_dir(r);
  make_private_dir(dir);
  r.redis_port = redis_port_for(r, bind);
  auto memory = o.storage_memory ? o.storage_memory
                                 : (r.redis_maxmemory ? r.redis_maxmemory : default_storage_memory(mem_total()));
  bool was = same_bind && old_cert == r.tls_cert && memory == r.redis_maxmemory &&
             redis_alive(dir, r.redis_port, bind, r.tls_cert);
  if (!was) {
    stop_redis(dir, 10s);  // one running with other settings
    r.redis_maxmemory = memory;
    start_redis({dir, server, bind, r.redis_port, memory, {r.tls_cert, r.tls_key, r.tls_ca}});
  }
  s.redis_password = redis_password(dir);
  bool open = !bind.empty() && bind.rfind("127.", 0) != 0;
  s.redis_host = !open ? "127.0.0.1" : (bind == "0.0.0.0" ? config::short_hostname() : bind);
  if (!r.tls_cert.empty() && r.broker_managed && bind == "0.0.0.0") {
    s.redis_host = config::parse_amqp_url(s.url).host;  // the name the certificate is for, as the broker's
  }
  s.lines.push_back(fmt::format("storage     {:<22} {} {}:{} (maxmemory {}, noeviction)  logs: {}/redis.log",
                                state_word(was), r.tls_cert.empty() ? "redis" : "redis+TLS", s.redis_host, r.redis_port,
                                human_bytes(static_cast<double>(memory)), dir));
}

std::vector<config::YamlSet> settings_for(const Record& r, const Started& s) {
  std::vector<config::YamlSet> sets = {
      {"lithops", "backend", "singularity"},
      {"lithops", "storage", r.storage},
      {"rabbitmq", "amqp_url", s.url},
  };
  if (r.redis_managed) {
    sets.push_back({"redis", "host", s.redis_host});
    sets.push_back({"redis", "port", std::to_string(r.redis_port), false});
    sets.push_back({"redis", "password", s.redis_password});
    if (!r.tls_cert.empty()) {
      // Lithops hands this section to redis.Redis(**section): redis-py's own names.
      sets.push_back({"redis", "ssl", "true", false});
      sets.push_back({"redis", "ssl_check_hostname", "true", false});
      if (!r.tls_ca.empty()) {
        sets.push_back({"redis", "ssl_ca_certs", r.tls_ca});
      }
    }
  }
  return sets;
}

std::string config_line(const ConfigWrite& w) {
  if (!w.changed) {
    return "Lithops config: " + w.path + " (already up to date)";
  }
  auto line = "Lithops config: " + w.path +
              (w.backup.empty() ? " (created, 0600)" : " (updated; the previous one is " + w.backup + ")");
  if (w.comments_lost) {
    spdlog::warn(
        "{}: its layout is beyond line editing (flow style or anchors): rewritten without its comments; "
        "they are in {}",
        w.path, w.backup);
  }
  return line;
}

// The last lines of the controller's log (it only grows: its last 8 KiB),
// for the error when the controller ends at once.
std::string log_tail(const std::string& path, std::size_t lines) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    return "";
  }
  auto size = static_cast<std::streamoff>(in.tellg());
  in.seekg(std::max<std::streamoff>(0, size - 8192));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto all = split(text, '\n');
  while (!all.empty() && all.back().empty()) {
    all.pop_back();
  }
  std::string out;
  for (std::size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    out += "\n  " + bounded_for_log(all[i]);
  }
  return out;
}

// Some settings the controller refuses only once it runs (a time limit not
// above --renew-before, another controller on the state directory): wait
// until it has looked at the queue once (its state file names its pid) or
// has ended, so up never reports a controller that is already gone. False
// when neither happened within k_controller_start.
bool await_controller(Child& child, const std::string& log) {
  auto deadline = std::chrono::steady_clock::now() + k_controller_start;
  while (std::chrono::steady_clock::now() < deadline) {
    if (child.wait_for(100ms)) {
      throw Error(Exit::failure,
                  fmt::format("the autoalloc controller ended at start (exit {}); the end of {}:{}",
                              status_exit_code(*child.status()), log, log_tail(log, 5)),
                  "fix what it says and run 'lithops-hpc up' again (the broker and the store are left running)");
    }
    try {
      if (auto st = autoalloc::load_state(); st && st->pid == child.pid()) {
        return true;
      }
    } catch (const Error&) {
      // not written yet, or being replaced: look again
    }
  }
  return false;
}

void start_controller(const UpOptions& o, Record& r, Started& s) {
  if (o.sif.empty() && !controller_alive(r)) {
    r.controller_pid = 0;
    s.lines.push_back("controller  not started (give --sif PATH or --runtime NAME: deployments then follow the queue)");
    return;
  }
  r.controller_log = services_dir() + "/autoalloc.log";
  if (controller_alive(r)) {  // one started before, whatever image it serves
    s.lines.push_back(
        fmt::format("controller  {:<22} pid {}  log: {}", state_word(true), r.controller_pid, r.controller_log));
    return;
  }
  SpawnOptions so;
  so.argv = {o.self};
  if (!o.config_path.empty()) {
    so.argv.insert(so.argv.end(), {"--config", o.config_path});
  }
  so.argv.insert(so.argv.end(), {"autoalloc", "--sif", o.sif});
  if (o.local) {
    so.argv.push_back("--local");
  }
  if (o.max_nodes > 0) {
    so.argv.insert(so.argv.end(), {"--max-nodes", std::to_string(o.max_nodes)});
  }
  if (!o.sbatch_args.empty()) {
    so.argv.push_back("--");
    so.argv.insert(so.argv.end(), o.sbatch_args.begin(), o.sbatch_args.end());
  }
  auto env = Env::current();
  env.set("AMQP_URL", s.url);  // the environment, never the command line
  so.env = env;
  so.new_session = true;
  UniqueFd log(::open(r.controller_log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600));
  so.stdout_fd = log.get();
  so.stderr_fd = log.get();
  auto child = spawn(so);
  bool looking = await_controller(child, r.controller_log);
  r.controller_pid = child.release();
  s.lines.push_back(fmt::format("controller  {:<22} pid {}  log: {}", looking ? "started" : "started (not looking yet)",
                                r.controller_pid, r.controller_log));
}

std::string report(const Record& r, const Started& s, const std::string& config) {
  std::string out = "lithops-hpc services on " + r.host + " (state: " + services_dir() + "):\n";
  for (const auto& l : s.lines) {
    out += "  " + l + "\n";
  }
  out += config + "\n";
  if (r.broker_managed && r.tls_cert.empty() && (r.bind.empty() || r.bind.rfind("127.", 0) == 0)) {
    out +=
        "They listen on this host's loopback only: clients and workers on this host reach them; for compute nodes "
        "start them with --bind ADDR (a trusted network) or TLS.\n";
  }
  out += "Try:\n  " + std::string(k_try_line) + "\nStop them all: lithops-hpc down\n";
  return out;
}

}  // namespace

std::string up(const UpOptions& o) {
  auto lock = lock_services();
  auto r = prepare_record(o);
  check_data_dir(o, r);
  auto redis_server = check_servers(o);
  make_private_dir(r.data_dir);
  Started s;
  ensure_broker(o, r, s);
  ensure_redis(o, redis_server, r, s);
  r.running = true;
  r.updated = unix_now();
  save_record(r);  // before the config: a failure there leaves what runs known to `down`
  auto w = write_lithops_config(lithops_config_target(), settings_for(r, s));
  r.lithops_config = w.path;
  start_controller(o, r, s);
  save_record(r);
  return report(r, s, config_line(w));
}

namespace {

void stop_controller(Record& r, std::vector<std::string>& lines) {
  if (!controller_alive(r)) {
    r.controller_pid = 0;
    return;
  }
  auto pid = static_cast<pid_t>(r.controller_pid);
  ::kill(pid, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (::kill(pid, 0) == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  if (::kill(pid, 0) == 0) {
    ::kill(pid, SIGKILL);
  }
  lines.push_back(fmt::format("controller  stopped (pid {})", r.controller_pid));
  r.controller_pid = 0;
}

void forget_data(const Record& r, std::vector<std::string>& lines) {
  if (r.redis_managed) {
    remove_tree(redis_dir(r) + "/data");
  }
  if (r.broker_managed) {
    remove_tree(broker_dir(r) + "/mnesia");
  }
  lines.push_back(
      "data        removed (queues, stored objects); ports and passwords kept, so the Lithops config "
      "stays valid for the next up");
}

}  // namespace

std::string down(bool keep_data, const std::function<void()>& stop_deployments) {
  auto lock = lock_services();
  auto old = load_record();
  if (!old) {
    stop_deployments();
    return "no services of lithops-hpc up to stop (" + services_dir() + " has no record)\n";
  }
  auto r = *old;
  if (r.running && r.host != this_host()) {
    throw Error(Exit::failure, "your lithops-hpc services run on " + r.host + ", not here",
                "run lithops-hpc down on " + r.host);
  }
  std::vector<std::string> lines;
  stop_controller(r, lines);  // first: it would submit again while tasks wait
  stop_deployments();         // they drain through the broker: it goes after them
  if (r.redis_managed && stop_redis(redis_dir(r), 30s)) {
    lines.push_back("storage     stopped (redis, port " + std::to_string(r.redis_port) + ")");
  }
  if (r.broker_managed) {
    bool was = broker_running(broker_dir(r));
    stop_broker(broker_dir(r), services_dir() + "/broker-script.log");
    if (was) {
      lines.push_back("broker      stopped");
    }
  }
  if (!keep_data) {
    forget_data(r, lines);
  }
  r.running = false;
  r.updated = unix_now();
  save_record(r);
  std::string out = "lithops-hpc services on " + r.host + ":\n";
  for (const auto& l : lines) {
    out += "  " + l + "\n";
  }
  return out + "nothing of lithops-hpc up is running now\n";
}

namespace {

std::string queue_part(const std::string& url, const std::string& queue) {
  try {
    amqp::Options ao;
    ao.url = url;
    ao.timeout = 3s;
    ao.heartbeat = 0;
    ao.connection_name = "lithops-hpc status";
    amqp::Connection c(ao);
    auto info = c.queue_info(queue);
    return info ? fmt::format("{}: {} waiting, {} consumers", queue, info->messages, info->consumers)
                : queue + ": not declared yet";
  } catch (const Error&) {
    return queue + ": no answer";
  }
}

std::string broker_part(const Record& r, const std::string& queue) {
  if (!r.broker_managed) {
    return "broker: the site's";
  }
  auto dir = broker_dir(r);
  auto url = broker_url(dir);
  if (!broker_running(dir) || !url) {
    return "broker down";
  }
  return "broker up " + config::redact_url(*url) + " (" + queue_part(*url, queue) + ")";
}

std::string redis_part(const Record& r) {
  if (!r.redis_managed) {
    return "storage: " + r.storage + " (not ours)";
  }
  auto dir = redis_dir(r);
  auto used = redis_used_memory(dir, r.redis_port, redis_bind(r), r.tls_cert);
  if (!used) {
    return fmt::format("redis down (port {})", r.redis_port);
  }
  return fmt::format("{} up {}:{} ({} of {} used)", r.tls_cert.empty() ? "redis" : "redis+TLS",
                     probe_address(redis_bind(r)), r.redis_port, human_bytes(static_cast<double>(*used)),
                     human_bytes(static_cast<double>(r.redis_maxmemory)));
}

}  // namespace

std::optional<std::string> status_line(const std::string& queue) {
  auto r = load_record();
  if (!r) {
    return std::nullopt;
  }
  if (!r->running) {
    return "services: down (lithops-hpc up starts them)";
  }
  if (r->host != this_host()) {
    return "services: on " + r->host + " (lithops-hpc status there shows them)";
  }
  std::string ctl = r->controller_pid == 0 ? "no controller"
                    : controller_alive(*r) ? fmt::format("controller up (pid {})", r->controller_pid)
                                           : "controller down";
  return "services: " + broker_part(*r, queue) + ", " + redis_part(*r) + ", " + ctl;
}

}  // namespace lhpc::services
