#include "config/config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <functional>
#include <map>
#include <regex>
#include <sstream>
#include <toml++/toml.h>

#include "util/error.h"
#include "util/fs.h"
#include "util/strings.h"

namespace lhpc::config {

std::string to_string(Engine e) {
  switch (e) {
    case Engine::singularity: return "singularity";
    case Engine::apptainer: return "apptainer";
    case Engine::host: return "host";
  }
  return "?";
}
std::string to_string(Transfer t) {
  switch (t) {
    case Transfer::mpi: return "mpi";
    case Transfer::sbcast: return "sbcast";
    case Transfer::none: return "none";
  }
  return "?";
}
std::string to_string(Mode m) { return m == Mode::dispatch ? "dispatch" : "runscript"; }

std::optional<Engine> parse_engine(const std::string& s) {
  for (auto e : {Engine::singularity, Engine::apptainer, Engine::host}) {
    if (s == to_string(e)) {
      return e;
    }
  }
  return std::nullopt;
}
std::optional<Transfer> parse_transfer(const std::string& s) {
  for (auto t : {Transfer::mpi, Transfer::sbcast, Transfer::none}) {
    if (s == to_string(t)) {
      return t;
    }
  }
  return std::nullopt;
}
std::optional<Mode> parse_mode(const std::string& s) {
  for (auto m : {Mode::dispatch, Mode::runscript}) {
    if (s == to_string(m)) {
      return m;
    }
  }
  return std::nullopt;
}

namespace {

template <typename E>
std::string choice_error(const std::string& text, std::optional<E> (*parse)(const std::string&),
                         std::initializer_list<E> all) {
  if (parse(text)) {
    return {};
  }
  std::string names;
  for (auto e : all) {
    names += (names.empty() ? "" : ", ") + to_string(e);
  }
  return "'" + text + "' is not one of " + names;
}

}  // namespace

std::string engine_error(const std::string& text) {
  return choice_error(text, parse_engine, {Engine::singularity, Engine::apptainer, Engine::host});
}
std::string transfer_error(const std::string& text) {
  return choice_error(text, parse_transfer, {Transfer::mpi, Transfer::sbcast, Transfer::none});
}
std::string mode_error(const std::string& text) {
  return choice_error(text, parse_mode, {Mode::dispatch, Mode::runscript});
}

namespace {

std::string where(const std::string& source, const toml::source_region& r) {
  return source + ":" + std::to_string(r.begin.line) + ":" + std::to_string(r.begin.column);
}

[[noreturn]] void fail_at(const std::string& source, const toml::node& n, const std::string& key, const std::string& what,
                          const std::string& hint = {}) {
  throw Error(Exit::config, where(source, n.source()) + ": " + key + ": " + what, hint);
}

// One entry per key: its type is checked before `set` runs, `set` checks the value.
enum class Kind { string, boolean, integer, number, string_array };
struct Key {
  Kind kind;
  std::function<void(Config&, const toml::node&, const std::string& full, const std::string& src)> set;
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::string: return "a string";
    case Kind::boolean: return "a boolean (true or false)";
    case Kind::integer: return "an integer";
    case Kind::number: return "a number";
    case Kind::string_array: return "an array of strings";
  }
  return "?";
}

bool kind_matches(Kind k, const toml::node& n) {
  switch (k) {
    case Kind::string: return n.is_string();
    case Kind::boolean: return n.is_boolean();
    case Kind::integer: return n.is_integer();
    case Kind::number: return n.is_integer() || n.is_floating_point();
    case Kind::string_array: {
      auto* a = n.as_array();
      return a && std::all_of(a->begin(), a->end(), [](const toml::node& e) { return e.is_string(); });
    }
  }
  return false;
}

std::string str(const toml::node& n) { return n.value<std::string>().value_or(""); }
std::int64_t integer(const toml::node& n) { return n.value<std::int64_t>().value_or(0); }
double number(const toml::node& n) { return n.value<double>().value_or(0.0); }

template <typename T>
Key string_key(T Config::*section, std::string T::*field) {
  return {Kind::string, [=](Config& c, const toml::node& n, const std::string&, const std::string&) {
            (c.*section).*field = str(n);
          }};
}
template <typename T>
Key bool_key(T Config::*section, bool T::*field) {
  return {Kind::boolean, [=](Config& c, const toml::node& n, const std::string&, const std::string&) {
            (c.*section).*field = n.value<bool>().value_or(false);
          }};
}
template <typename T>
Key int_key(T Config::*section, int T::*field, std::int64_t lo, std::int64_t hi) {
  return {Kind::integer, [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto v = integer(n);
            if (v < lo || v > hi) {
              fail_at(src, n, full, std::to_string(v) + " is out of range",
                      "use a value from " + std::to_string(lo) + " to " + std::to_string(hi));
            }
            (c.*section).*field = static_cast<int>(v);
          }};
}
template <typename T>
Key seconds_key(T Config::*section, double T::*field, double lo) {
  return {Kind::number, [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto v = number(n);
            if (!(v >= lo) || v > 1e7) {
              fail_at(src, n, full, "must be at least " + std::to_string(lo) + " seconds");
            }
            (c.*section).*field = v;
          }};
}
template <typename E, typename T>
Key enum_key(T Config::*section, E T::*field, std::optional<E> (*parse)(const std::string&),
             std::string (*error)(const std::string&)) {
  return {Kind::string, [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto v = parse(str(n));
            if (!v) {
              fail_at(src, n, full, error(str(n)));
            }
            (c.*section).*field = *v;
          }};
}

const std::map<std::string, std::map<std::string, Key>>& schema() {
  static const std::map<std::string, std::map<std::string, Key>> s = {
      {"singularity",
       {
           {"sif_path", string_key(&Config::singularity, &Singularity::sif_path)},
           {"runtime", string_key(&Config::singularity, &Singularity::runtime)},
           {"engine", enum_key(&Config::singularity, &Singularity::engine, parse_engine, engine_error)},
           {"fakeroot", bool_key(&Config::singularity, &Singularity::fakeroot)},
           {"nv", bool_key(&Config::singularity, &Singularity::nv)},
           {"instance_name",
            {Kind::string,
             [](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
               static const std::regex ok("^[a-zA-Z0-9._-]+$");
               if (!std::regex_match(str(n), ok)) {
                 fail_at(src, n, full, "'" + str(n) + "' is not a valid instance name",
                         "use letters, digits, '.', '_' and '-' only");
               }
               c.singularity.instance_name = str(n);
             }}},
           {"binds",
            {Kind::string_array,
             [](Config& c, const toml::node& n, const std::string&, const std::string&) {
               c.singularity.binds.clear();
               for (const auto& e : *n.as_array()) {
                 c.singularity.binds.push_back(str(e));
               }
             }}},
           {"worker_processes", int_key(&Config::singularity, &Singularity::worker_processes, 0, 4096)},
           {"python", string_key(&Config::singularity, &Singularity::python)},
       }},
      {"rabbitmq",
       {
           {"amqp_url",
            {Kind::string,
             [](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
               try {
                 parse_amqp_url(str(n));
               } catch (const Error& e) {
                 fail_at(src, n, full, e.what(), e.hint());
               }
               c.rabbitmq.amqp_url = str(n);
             }}},
           {"queue", string_key(&Config::rabbitmq, &Rabbitmq::queue)},
           {"heartbeat", int_key(&Config::rabbitmq, &Rabbitmq::heartbeat, 0, 3600)},
           {"ca_cert", string_key(&Config::rabbitmq, &Rabbitmq::ca_cert)},
           {"verify_peer", bool_key(&Config::rabbitmq, &Rabbitmq::verify_peer)},
       }},
      {"deploy",
       {
           {"transfer", enum_key(&Config::deploy, &Deploy::transfer, parse_transfer, transfer_error)},
           {"chunk_mib", int_key(&Config::deploy, &Deploy::chunk_mib, 1, 1024)},
           {"compress", bool_key(&Config::deploy, &Deploy::compress)},
           {"cleanup", bool_key(&Config::deploy, &Deploy::cleanup)},
           {"mode", enum_key(&Config::deploy, &Deploy::mode, parse_mode, mode_error)},
           {"drain_timeout", seconds_key(&Config::deploy, &Deploy::drain_timeout, 0)},
           {"drain_before_end", seconds_key(&Config::deploy, &Deploy::drain_before_end, 0)},
           {"min_ranks", int_key(&Config::deploy, &Deploy::min_ranks, 0, 1 << 20)},
           {"start_timeout", seconds_key(&Config::deploy, &Deploy::start_timeout, 1)},
           {"restart_limit", int_key(&Config::deploy, &Deploy::restart_limit, 0, 1000)},
       }},
      {"health",
       {
           {"interval", seconds_key(&Config::health, &Health::interval, 0.1)},
           {"status_file", string_key(&Config::health, &Health::status_file)},
       }},
  };
  return s;
}

template <typename Map>
std::string did_you_mean(const std::string& name, const Map& known) {
  std::string best;
  std::size_t best_d = 3;
  for (const auto& [k, _] : known) {
    auto d = edit_distance(name, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best.empty() ? std::string() : "did you mean '" + best + "'?";
}

std::string list_keys(const std::map<std::string, Key>& keys) {
  std::vector<std::string> names;
  for (const auto& [k, _] : keys) {
    names.push_back(k);
  }
  return join(names, ", ");
}

bool url_has_password(const std::string& url) {
  try {
    auto u = parse_amqp_url(url);
    return url.find('@') != std::string::npos && !u.password.empty();
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

Config parse(const std::string& toml_text, const std::string& source_name) {
  toml::table root;
  try {
    root = toml::parse(toml_text, source_name);
  } catch (const toml::parse_error& e) {
    throw Error(Exit::config, where(source_name, e.source()) + ": " + std::string(e.description()),
                "fix the TOML syntax at that position");
  }
  Config cfg;
  cfg.source = source_name;
  const auto& sch = schema();
  for (const auto& [sec_key, sec_node] : root) {
    std::string sec(sec_key.str());
    auto sit = sch.find(sec);
    if (sit == sch.end()) {
      throw Error(Exit::config, where(source_name, sec_node.source()) + ": unknown section [" + sec + "]",
                  join({did_you_mean(sec, sch), "sections are [singularity], [rabbitmq], [deploy], [health]"}, " "));
    }
    auto* table = sec_node.as_table();
    if (!table) {
      throw Error(Exit::config, where(source_name, sec_node.source()) + ": " + sec + " must be a table ([" + sec + "])");
    }
    for (const auto& [key, node] : *table) {
      std::string k(key.str());
      std::string full = sec + "." + k;
      auto kit = sit->second.find(k);
      if (kit == sit->second.end()) {
        auto hint = did_you_mean(k, sit->second);
        throw Error(Exit::config, where(source_name, node.source()) + ": unknown key " + full,
                    (hint.empty() ? "" : hint + " ") + "[" + sec + "] accepts: " + list_keys(sit->second));
      }
      if (!kind_matches(kit->second.kind, node)) {
        fail_at(source_name, node, full,
                std::string("wrong type: expected ") + kind_name(kit->second.kind) + ", got " +
                    std::string(toml::impl::node_type_friendly_names[static_cast<int>(node.type())]));
      }
      kit->second.set(cfg, node, full, source_name);
    }
  }
  return cfg;
}

std::optional<std::string> find_config_file(const std::string& explicit_path) {
  if (!explicit_path.empty()) {
    return explicit_path;
  }
  if (const char* e = std::getenv("LITHOPS_HPC_CONFIG"); e && *e) {
    return std::string(e);
  }
  std::string xdg;
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x) {
    xdg = x;
  } else {
    xdg = home_dir() + "/.config";
  }
  for (const auto& cand : {xdg + "/lithops-hpc/config.toml", std::string("/etc/lithops-hpc/config.toml")}) {
    if (path_exists(cand)) {
      return cand;
    }
  }
  return std::nullopt;
}

Config load(const std::string& explicit_path) {
  Config cfg;
  if (auto file = find_config_file(explicit_path)) {
    if (!path_exists(*file)) {
      throw Error(Exit::config, "config file " + *file + " does not exist",
                  explicit_path.empty() ? "unset LITHOPS_HPC_CONFIG or point it at a file"
                                        : "check the path given to --config");
    }
    std::string text;
    try {
      text = read_file(*file);
    } catch (const Error& e) {
      throw Error(Exit::config, e.what(), "check the file's permissions");
    }
    cfg = parse(text, *file);
    struct stat st {};
    if (::stat(file->c_str(), &st) == 0 && (st.st_mode & 0044) && url_has_password(cfg.rabbitmq.amqp_url)) {
      cfg.warnings.push_back(*file + " holds a broker password and others can read it; run: chmod 600 " + *file);
    }
  }
  if (const char* u = std::getenv("AMQP_URL"); u && *u) {
    try {
      parse_amqp_url(u);
    } catch (const Error& e) {
      throw Error(Exit::config, std::string("AMQP_URL (environment): ") + e.what(), e.hint());
    }
    cfg.rabbitmq.amqp_url = u;
    cfg.amqp_url_from_env = true;
  }
  return cfg;
}

void require_amqp_url(const Config& cfg) {
  if (!cfg.rabbitmq.amqp_url.empty()) {
    return;
  }
  std::string from = cfg.source.empty() ? "no config file was found" : cfg.source;
  throw Error(Exit::config, "rabbitmq.amqp_url is required (" + from + ")",
              "add [rabbitmq] amqp_url = \"amqp://user:password@host:5672/vhost\" to the config, "
              "or export AMQP_URL");
}

std::string short_hostname() {
  char buf[256] = {};
  ::gethostname(buf, sizeof buf - 1);
  std::string h(buf);
  return h.substr(0, h.find('.'));
}

Placeholders current_placeholders() {
  Placeholders ph;
  if (const char* j = std::getenv("SLURM_JOB_ID"); j && *j) {
    ph.jobid = j;
  } else if (const char* l = std::getenv("LITHOPS_HPC_JOB_ID"); l && *l) {
    ph.jobid = l;
  } else {
    ph.jobid = "local";
  }
  if (const char* n = std::getenv("LITHOPS_HPC_NODE_ID"); n && *n) {
    ph.node = n;
  } else {
    ph.node = short_hostname();
  }
  ph.user = user_name();
  return ph;
}

std::string expand(const std::string& pattern, const Placeholders& ph) {
  std::string out;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '%') {
      out += pattern[i];
      continue;
    }
    if (i + 1 == pattern.size()) {
      throw Error(Exit::config, "'" + pattern + "' ends with a lone '%'", "write %% for a literal percent sign");
    }
    char c = pattern[++i];
    switch (c) {
      case 'j': out += ph.jobid; break;
      case 'n': out += ph.node; break;
      case 'u': out += ph.user; break;
      case '%': out += '%'; break;
      default:
        throw Error(Exit::config, std::string("unknown placeholder %") + c + " in '" + pattern + "'",
                    "placeholders are %j (job id), %n (node name), %u (user), %% (a literal %)");
    }
  }
  return out;
}

Config expanded(const Config& cfg, const Placeholders& ph) {
  Config c = cfg;
  c.singularity.sif_path = expand(cfg.singularity.sif_path, ph);
  c.health.status_file = expand(cfg.health.status_file, ph);
  for (auto& b : c.singularity.binds) {
    b = expand(b, ph);
  }
  return c;
}

namespace {
std::string percent_decode(const std::string& s, const std::string& what) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%') {
      if (i + 2 >= s.size() + 0 || !std::isxdigit(static_cast<unsigned char>(s[i + 1])) ||
          !std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
        throw Error(Exit::config, "bad percent-escape in the " + what + " of the AMQP URL");
      }
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}
}  // namespace

AmqpUrl parse_amqp_url(const std::string& url) {
  AmqpUrl u;
  std::string rest;
  if (starts_with(url, "amqp://")) {
    rest = url.substr(7);
  } else if (starts_with(url, "amqps://")) {
    rest = url.substr(8);
    u.tls = true;
    u.port = 5671;
  } else {
    throw Error(Exit::config, "'" + redact_url(url) + "' is not an AMQP URL",
                "write amqp://user:password@host:5672/vhost (or amqps:// for TLS)");
  }
  std::string authority = rest, path;
  if (auto slash = rest.find('/'); slash != std::string::npos) {
    authority = rest.substr(0, slash);
    path = rest.substr(slash + 1);
  }
  if (auto at = authority.rfind('@'); at != std::string::npos) {
    std::string userinfo = authority.substr(0, at);
    authority = authority.substr(at + 1);
    auto colon = userinfo.find(':');
    u.user = percent_decode(userinfo.substr(0, colon), "user");
    u.password = colon == std::string::npos ? "" : percent_decode(userinfo.substr(colon + 1), "password");
  }
  std::string host = authority;
  if (auto colon = authority.rfind(':'); colon != std::string::npos && authority.find(']') == std::string::npos) {
    host = authority.substr(0, colon);
    std::string port = authority.substr(colon + 1);
    if (port.empty() || port.find_first_not_of("0123456789") != std::string::npos || port.size() > 5 ||
        std::stoi(port) < 1 || std::stoi(port) > 65535) {
      throw Error(Exit::config, "bad port '" + port + "' in the AMQP URL " + redact_url(url),
                  "the port is a number from 1 to 65535");
    }
    u.port = std::stoi(port);
  }
  if (host.empty()) {
    throw Error(Exit::config, "no host in the AMQP URL " + redact_url(url), "write amqp://user:password@HOST:5672/vhost");
  }
  u.host = host;
  if (!path.empty()) {
    u.vhost = percent_decode(path, "vhost");
  }
  return u;
}

std::string redact_url(const std::string& url) {
  auto scheme = url.find("://");
  if (scheme == std::string::npos) {
    return url.find('@') == std::string::npos ? url : "***";
  }
  auto start = scheme + 3;
  auto slash = url.find('/', start);
  auto at = url.rfind('@', slash == std::string::npos ? std::string::npos : slash);
  if (at == std::string::npos || at < start) {
    return url;
  }
  auto colon = url.find(':', start);
  if (colon == std::string::npos || colon > at) {
    return url;  // user only, no password
  }
  return url.substr(0, colon + 1) + "***" + url.substr(at);
}

std::string to_toml(const Config& c) {
  auto q = [](const std::string& s) {
    std::ostringstream os;
    os << toml::value<std::string>(s);
    return os.str();
  };
  auto b = [](bool v) { return v ? "true" : "false"; };
  std::ostringstream o;
  o << "[singularity]\n"
    << "sif_path = " << q(c.singularity.sif_path) << "\n"
    << "runtime = " << q(c.singularity.runtime) << "\n"
    << "engine = " << q(to_string(c.singularity.engine)) << "\n"
    << "fakeroot = " << b(c.singularity.fakeroot) << "\n"
    << "nv = " << b(c.singularity.nv) << "\n"
    << "instance_name = " << q(c.singularity.instance_name) << "\n"
    << "binds = [";
  for (std::size_t i = 0; i < c.singularity.binds.size(); ++i) {
    o << (i ? ", " : "") << q(c.singularity.binds[i]);
  }
  o << "]\n"
    << "worker_processes = " << c.singularity.worker_processes << "\n"
    << "python = " << q(c.singularity.python) << "\n\n"
    << "[rabbitmq]\n"
    << "amqp_url = " << q(redact_url(c.rabbitmq.amqp_url)) << (c.amqp_url_from_env ? "  # from AMQP_URL" : "") << "\n"
    << "queue = " << q(c.rabbitmq.queue) << "\n"
    << "heartbeat = " << c.rabbitmq.heartbeat << "\n"
    << "ca_cert = " << q(c.rabbitmq.ca_cert) << "\n"
    << "verify_peer = " << b(c.rabbitmq.verify_peer) << "\n\n"
    << "[deploy]\n"
    << "transfer = " << q(to_string(c.deploy.transfer)) << "\n"
    << "chunk_mib = " << c.deploy.chunk_mib << "\n"
    << "compress = " << b(c.deploy.compress) << "\n"
    << "cleanup = " << b(c.deploy.cleanup) << "\n"
    << "mode = " << q(to_string(c.deploy.mode)) << "\n"
    << "drain_timeout = " << c.deploy.drain_timeout << "\n"
    << "drain_before_end = " << c.deploy.drain_before_end << "\n"
    << "min_ranks = " << c.deploy.min_ranks << "\n"
    << "start_timeout = " << c.deploy.start_timeout << "\n"
    << "restart_limit = " << c.deploy.restart_limit << "\n\n"
    << "[health]\n"
    << "interval = " << c.health.interval << "\n"
    << "status_file = " << q(c.health.status_file) << "\n";
  return o.str();
}

}  // namespace lhpc::config
