#include "config/config.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <toml++/toml.h>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <functional>
#include <map>
#include <sstream>

#include "config/text_guard.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/names.h"
#include "util/strings.h"

namespace lhpc::config {

std::string to_string(const Origin& o) {
  switch (o.from) {
    case From::default_value: return "default";
    case From::lithops_yaml:
    case From::toml: return o.where;
    case From::environment: return "environment (" + o.where + ")";
    case From::flag: return "flag " + o.where;
  }
  return "?";
}

Origin Config::origin(const std::string& key) const {
  auto it = origins.find(key);
  return it == origins.end() ? Origin{} : it->second;
}

void Config::set_by_flag(const std::string& key, const std::string& flag) { origins[key] = {From::flag, flag}; }

std::string LithopsClient::where(const Value& v) const {
  return v.line > 0 ? source + ":" + std::to_string(v.line) : source;
}

std::string logs_dir_error(const std::string& text) {
  if (text == "node" || text == "state" || (!text.empty() && text.front() == '/')) {
    return "";
  }
  return "'" + text + "' is not one of node, state or an absolute path";
}

namespace {

// Engines refuse long instance names, and any name is capped before it is
// looked at, whatever its length in the file.
constexpr std::size_t k_max_instance_name = 64;
constexpr std::size_t k_max_runtime_name = 200;

bool name_chars_ok(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char ch) {
    auto c = static_cast<unsigned char>(ch);
    return std::isalnum(c) || c == '.' || c == '_' || c == '-';
  });
}

std::string where(const std::string& source, const toml::source_region& r) {
  return source + ":" + std::to_string(r.begin.line) + ":" + std::to_string(r.begin.column);
}

[[noreturn]] void fail_at(const std::string& source, const toml::node& n, const std::string& key,
                          const std::string& what, const std::string& hint = {}) {
  throw Error(Exit::config, where(source, n.source()) + ": " + key + ": " + what, hint);
}

std::string toml_quote(const std::string& s) {
  std::ostringstream os;
  os << toml::value<std::string>(s);
  return os.str();
}

std::string toml_bool(bool v) { return v ? "true" : "false"; }

template <typename T>
std::string toml_num(T v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string toml_array(const std::vector<std::string>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    out += (i ? ", " : "") + toml_quote(v[i]);
  }
  return out + "]";
}

// One entry per key, the only place a key is named: the reader checks its
// type before `set` runs and `set` checks the value; `show` writes the
// effective value (to_toml, `config check`'s listing). The default is the
// field's initializer in config.h, which `show` prints for a Config{}.
enum class Kind { string, boolean, integer, number, string_array };
using Set = std::function<void(Config&, const toml::node&, const std::string& full, const std::string& src)>;
struct Key {
  std::string_view name;
  Kind kind;
  Set set;
  std::function<std::string(const Config&)> show;
};
struct Section {
  std::string_view name;
  std::vector<Key> keys;
};

// How a type error names the type it expected.
constexpr Names<Kind, 5> k_kind_names{{{
    {Kind::string, "a string"},
    {Kind::boolean, "a boolean (true or false)"},
    {Kind::integer, "an integer"},
    {Kind::number, "a number"},
    {Kind::string_array, "an array of strings"},
}}};

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

// A string value's own check (beyond its type); throws through fail_at.
using Check =
    std::function<void(const std::string& value, const toml::node&, const std::string& full, const std::string& src)>;

template <typename T>
Key string_key(std::string_view name, T Config::*section, std::string T::*field, Check check = {}) {
  return {name, Kind::string,
          [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            if (check) {
              check(str(n), n, full, src);
            }
            (c.*section).*field = str(n);
          },
          [=](const Config& c) { return toml_quote((c.*section).*field); }};
}
template <typename T>
Key strings_key(std::string_view name, T Config::*section, std::vector<std::string> T::*field, Check check = {}) {
  return {name, Kind::string_array,
          [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto& to = (c.*section).*field;
            to.clear();
            for (const auto& e : *n.as_array()) {
              if (check) {
                check(str(e), e, full, src);
              }
              to.push_back(str(e));
            }
          },
          [=](const Config& c) { return toml_array((c.*section).*field); }};
}
template <typename T>
Key bool_key(std::string_view name, T Config::*section, bool T::*field) {
  return {name, Kind::boolean,
          [=](Config& c, const toml::node& n, const std::string&, const std::string&) {
            (c.*section).*field = n.value<bool>().value_or(false);
          },
          [=](const Config& c) { return toml_bool((c.*section).*field); }};
}
template <typename T>
Key int_key(std::string_view name, T Config::*section, int T::*field, std::int64_t lo, std::int64_t hi) {
  return {name, Kind::integer,
          [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto v = integer(n);
            if (v < lo || v > hi) {
              fail_at(src, n, full, std::to_string(v) + " is out of range",
                      "use a value from " + std::to_string(lo) + " to " + std::to_string(hi));
            }
            (c.*section).*field = static_cast<int>(v);
          },
          [=](const Config& c) { return toml_num((c.*section).*field); }};
}
template <typename T>
Key seconds_key(std::string_view name, T Config::*section, double T::*field, double lo) {
  return {name, Kind::number,
          [=](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto v = number(n);
            if (!(v >= lo) || v > 1e7) {
              fail_at(src, n, full, "must be at least " + std::to_string(lo) + " seconds");
            }
            (c.*section).*field = v;
          },
          [=](const Config& c) { return toml_num((c.*section).*field); }};
}
template <typename E, std::size_t N, typename T>
Key enum_key(std::string_view name, T Config::*section, E T::*field, const Names<E, N>& names) {
  return {name, Kind::string,
          [=, &names](Config& c, const toml::node& n, const std::string& full, const std::string& src) {
            auto v = names.parse(str(n));
            if (!v) {
              fail_at(src, n, full, names.error(str(n)));
            }
            (c.*section).*field = *v;
          },
          [=, &names](const Config& c) { return toml_quote(std::string(names.text((c.*section).*field))); }};
}

void check_runtime(const std::string& v, const toml::node& n, const std::string& full, const std::string& src) {
  if (auto problem = runtime_name_problem(v)) {
    fail_at(src, n, full, *problem, "the image is <sif_path>/<runtime>.sif: give the name without .sif");
  }
}

void check_instance_name(const std::string& name, const toml::node& n, const std::string& full,
                         const std::string& src) {
  if (name.empty() || name.size() > k_max_instance_name) {
    fail_at(src, n, full,
            "an instance name has 1 to " + std::to_string(k_max_instance_name) + " characters, this one " +
                std::to_string(name.size()));
  }
  if (!name_chars_ok(name)) {
    fail_at(src, n, full, "'" + name + "' is not a valid instance name", "use letters, digits, '.', '_' and '-' only");
  }
}

void check_url(const std::string& v, const toml::node& n, const std::string& full, const std::string& src) {
  try {
    parse_amqp_url(v);
  } catch (const Error& e) {
    fail_at(src, n, full, e.what(), e.hint());
  }
}

void check_logs_dir(const std::string& v, const toml::node& n, const std::string& full, const std::string& src) {
  if (auto e = logs_dir_error(v); !e.empty()) {
    fail_at(src, n, full, e, "see [logs] in lithops-hpc.toml(5)");
  }
}

Section singularity_keys() {
  using S = Singularity;
  const auto sec = &Config::singularity;
  return {"singularity",
          {
              string_key("sif_path", sec, &S::sif_path),
              string_key("runtime", sec, &S::runtime, check_runtime),
              enum_key("engine", sec, &S::engine, k_engine_names),
              bool_key("fakeroot", sec, &S::fakeroot),
              bool_key("nv", sec, &S::nv),
              string_key("instance_name", sec, &S::instance_name, check_instance_name),
              strings_key("binds", sec, &S::binds),
              int_key("worker_processes", sec, &S::worker_processes, 0, 4096),
              int_key("gpus_per_slot", sec, &S::gpus_per_slot, 0, 64),
              enum_key("gpu_vendor", sec, &S::gpu_vendor, k_gpu_vendor_names),
              string_key("python", sec, &S::python),
          }};
}

Section rabbitmq_keys() {
  using R = Rabbitmq;
  const auto sec = &Config::rabbitmq;
  auto url = string_key("amqp_url", sec, &R::amqp_url, check_url);
  url.show = [](const Config& c) { return toml_quote(redact_url(c.rabbitmq.amqp_url)); };  // a secret
  return {"rabbitmq",
          {
              url,
              string_key("queue", sec, &R::queue),
              int_key("heartbeat", sec, &R::heartbeat, 0, 3600),
              string_key("ca_cert", sec, &R::ca_cert),
              bool_key("verify_peer", sec, &R::verify_peer),
              int_key("max_message_bytes", sec, &R::max_message_bytes, 1024, 512 << 20),
              int_key("max_message_depth", sec, &R::max_message_depth, 8, 1000),
              int_key("consumer_timeout", sec, &R::consumer_timeout, 0, 365 * 86400),
          }};
}

Section deploy_keys() {
  using D = Deploy;
  const auto sec = &Config::deploy;
  return {"deploy",
          {
              enum_key("transfer", sec, &D::transfer, k_transfer_names),
              int_key("chunk_mib", sec, &D::chunk_mib, 1, 1024),
              bool_key("compress", sec, &D::compress),
              bool_key("cleanup", sec, &D::cleanup),
              enum_key("mode", sec, &D::mode, k_mode_names),
              seconds_key("drain_timeout", sec, &D::drain_timeout, 0),
              seconds_key("drain_before_end", sec, &D::drain_before_end, 0),
              int_key("min_ranks", sec, &D::min_ranks, 0, 1 << 20),
              seconds_key("start_timeout", sec, &D::start_timeout, 1),
              int_key("restart_limit", sec, &D::restart_limit, 0, 1000),
          }};
}

Section autoalloc_keys() {
  using A = Autoalloc;
  const auto sec = &Config::autoalloc;
  return {"autoalloc",
          {
              string_key("sif", sec, &A::sif),
              string_key("script", sec, &A::script),
              int_key("max_nodes", sec, &A::max_nodes, 1, 1 << 20),
              int_key("nodes_per_job", sec, &A::nodes_per_job, 1, 1 << 20),
              int_key("max_pending", sec, &A::max_pending, 1, 1000),
              int_key("min_nodes", sec, &A::min_nodes, 0, 1 << 20),
              seconds_key("idle_timeout", sec, &A::idle_timeout, 0),
              string_key("time_limit", sec, &A::time_limit),
              seconds_key("renew_before", sec, &A::renew_before, 0),
              seconds_key("poll", sec, &A::poll, 0.1),
              int_key("max_start_failures", sec, &A::max_start_failures, 1, 1000),
              bool_key("drain_on_exit", sec, &A::drain_on_exit),
              strings_key("sbatch_args", sec, &A::sbatch_args),
              enum_key("gpu_request", sec, &A::gpu_request, k_gpu_request_names),
              strings_key("runtimes", sec, &A::runtimes, check_runtime),
          }};
}

// Every section and key, in the order `config check` lists them.
const std::vector<Section>& schema() {
  static const std::vector<Section> s = {
      singularity_keys(),
      rabbitmq_keys(),
      deploy_keys(),
      {"health",
       {
           seconds_key("interval", &Config::health, &Health::interval, 0.1),
           string_key("status_file", &Config::health, &Health::status_file),
           seconds_key("keep_ended", &Config::health, &Health::keep_ended, 0),
       }},
      {"logs",
       {
           string_key("dir", &Config::logs, &Logs::dir, check_logs_dir),
           int_key("max_bytes", &Config::logs, &Logs::max_bytes, 4096, 2147483647),
           seconds_key("progress_interval", &Config::logs, &Logs::progress_interval, 0),
       }},
      autoalloc_keys(),
  };
  return s;
}

template <typename Entry>
std::vector<std::string> names_of(const std::vector<Entry>& entries) {
  std::vector<std::string> names;
  for (const auto& e : entries) {
    names.emplace_back(e.name);
  }
  return names;
}

template <typename Entry>
const Entry* find_named(const std::vector<Entry>& entries, const std::string& name) {
  auto it = std::find_if(entries.begin(), entries.end(), [&](const Entry& e) { return e.name == name; });
  return it == entries.end() ? nullptr : &*it;
}

std::string did_you_mean(const std::string& name, const std::vector<std::string>& known) {
  std::string best;
  std::size_t best_d = 3;
  for (const auto& k : known) {
    auto d = edit_distance(name, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best.empty() ? std::string() : "did you mean '" + best + "'?";
}

// Sorted, as the refusal of an unknown key lists them.
std::string list_keys(const Section& sec) {
  auto names = names_of(sec.keys);
  std::sort(names.begin(), names.end());
  return join(names, ", ");
}

}  // namespace

bool url_has_password(const std::string& url) {
  auto scheme = url.find("://");
  if (scheme == std::string::npos) {
    return false;
  }
  auto at = url.rfind('@');
  auto colon = url.find(':', scheme + 3);
  return at != std::string::npos && at > scheme && colon != std::string::npos && colon < at && colon + 1 < at;
}

namespace {

toml::table parse_toml_text(const std::string& toml_text, const std::string& source_name) {
  // toml++ 3.3.0 is not safe on every input: see text_guard.h.
  check_toml_text(toml_text, source_name);
  try {
    return toml::parse(toml_text, source_name);
  } catch (const toml::parse_error& e) {
    throw Error(Exit::config, where(source_name, e.source()) + ": " + std::string(e.description()),
                "fix the TOML syntax at that position");
  }
}

const Section& section_schema(const std::string& sec, const toml::node& sec_node, const std::string& source_name) {
  const auto* found = find_named(schema(), sec);
  if (found == nullptr) {
    std::string all;
    for (const auto& name : names_of(schema())) {
      all += (all.empty() ? "[" : ", [") + name + "]";
    }
    throw Error(Exit::config, where(source_name, sec_node.source()) + ": unknown section [" + sec + "]",
                join({did_you_mean(sec, names_of(schema())), "sections are " + all}, " "));
  }
  if (!sec_node.is_table()) {
    throw Error(Exit::config, where(source_name, sec_node.source()) + ": " + sec + " must be a table ([" + sec + "])");
  }
  return *found;
}

}  // namespace

Config parse(const std::string& toml_text, const std::string& source_name, Config cfg) {
  auto root = parse_toml_text(toml_text, source_name);
  cfg.source = source_name;
  for (const auto& [sec_key, sec_node] : root) {
    std::string sec(sec_key.str());
    const auto& section = section_schema(sec, sec_node, source_name);
    for (const auto& [key, node] : *sec_node.as_table()) {
      std::string k(key.str());
      std::string full = sec + "." + k;
      const auto* spec = find_named(section.keys, k);
      if (spec == nullptr) {
        auto hint = did_you_mean(k, names_of(section.keys));
        throw Error(Exit::config, where(source_name, node.source()) + ": unknown key " + full,
                    (hint.empty() ? "" : hint + " ") + "[" + sec + "] accepts: " + list_keys(section));
      }
      if (!kind_matches(spec->kind, node)) {
        fail_at(source_name, node, full,
                "wrong type: expected " + std::string(k_kind_names.text(spec->kind)) + ", got " +
                    std::string(toml::impl::node_type_friendly_names[static_cast<int>(node.type())]));
      }
      if (full == "singularity.runtime" && str(node).empty()) {
        continue;  // "" is "not set here" (older example files): the Lithops config's name stays
      }
      spec->set(cfg, node, full, source_name);
      cfg.origins[full] = {From::toml, source_name + ":" + std::to_string(node.source().begin.line)};
    }
  }
  return cfg;
}

std::string read_config_file(const std::string& path, const std::string& what) {
  // /dev/null: "no configuration", as scripts and tests say it (root's
  // device; never opened).
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3)) {
    return {};
  }
  std::optional<std::string> text;
  try {
    text = read_trusted_file(path, k_max_config_bytes, FileOwner::me_or_root);
  } catch (const Error& e) {
    throw Error(Exit::config, what + " " + path + " not read: " + e.what(), e.hint());
  }
  if (!text) {
    throw Error(Exit::config, "cannot open " + what + " " + path + ": " + errno_text(ENOENT), "check the path");
  }
  return *text;
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

namespace {

bool readable_by_others(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && (st.st_mode & 0044);
}

void load_lithops_yaml(Config& cfg) {
  if (const char* j = std::getenv("LITHOPS_CONFIG"); j && *j) {
    // Lithops reads $LITHOPS_CONFIG (JSON, a subset of YAML) before any file.
    cfg = parse_lithops_yaml(j, "LITHOPS_CONFIG (environment)", std::move(cfg));
    return;
  }
  auto file = find_lithops_config();
  if (!file) {
    return;
  }
  if (!path_exists(*file)) {
    cfg.warnings.push_back("LITHOPS_CONFIG_FILE names " + *file +
                           ", which does not exist: the Lithops client then runs in localhost mode; "
                           "fix the variable or create the file");
    return;
  }
  cfg = parse_lithops_yaml(read_config_file(*file, "Lithops config"), *file, std::move(cfg));
  if (cfg.lithops.amqp_url && url_has_password(cfg.lithops.amqp_url->text) && readable_by_others(*file)) {
    cfg.warnings.push_back(*file + " holds a broker password and others can read it; run: chmod 600 " + *file);
  }
}

void load_toml(Config& cfg, const std::string& explicit_path) {
  auto file = find_config_file(explicit_path);
  if (!file) {
    return;
  }
  if (!path_exists(*file)) {
    throw Error(
        Exit::config, "config file " + *file + " does not exist",
        explicit_path.empty() ? "unset LITHOPS_HPC_CONFIG or point it at a file" : "check the path given to --config");
  }
  cfg = parse(read_config_file(*file, "config file"), *file, std::move(cfg));
  if (cfg.origin("rabbitmq.amqp_url").from == From::toml && url_has_password(cfg.rabbitmq.amqp_url) &&
      readable_by_others(*file)) {
    cfg.warnings.push_back(*file + " holds a broker password and others can read it; run: chmod 600 " + *file);
  }
}

}  // namespace

Config load(const std::string& explicit_path) {
  Config cfg;
  load_lithops_yaml(cfg);
  load_toml(cfg, explicit_path);
  if (const char* u = std::getenv("AMQP_URL"); u && *u) {
    try {
      parse_amqp_url(u);
    } catch (const Error& e) {
      throw Error(Exit::config, std::string("AMQP_URL (environment): ") + e.what(), e.hint());
    }
    cfg.rabbitmq.amqp_url = u;
    cfg.amqp_url_from_env = true;
    cfg.origins["rabbitmq.amqp_url"] = {From::environment, "AMQP_URL"};
  }
  for (auto& w : security_warnings(cfg)) {
    cfg.warnings.push_back(std::move(w));
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
  c.logs.dir = expand(cfg.logs.dir, ph);
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

namespace {

// Splits "[userinfo@]hostport[/vhost]": the userinfo ends at the last '@', so
// a password holding a raw '@' still parses; a raw '/' in it cannot be told
// from the vhost's, and is refused without being quoted.
void split_authority(const std::string& url, const std::string& rest, AmqpUrl& u, std::string& hostport,
                     std::string& path) {
  auto at = rest.rfind('@');
  auto slash = rest.find('/');
  if (at != std::string::npos && slash != std::string::npos && slash < at) {
    throw Error(Exit::config, "the AMQP URL " + redact_url(url) + " has a '/' before its '@'",
                "percent-encode '/' in the user name or password as %2F (and '@' as %40, ':' as %3A)");
  }
  std::string authority = rest;
  if (at != std::string::npos) {
    std::string userinfo = rest.substr(0, at);
    auto colon = userinfo.find(':');
    u.user = percent_decode(userinfo.substr(0, colon), "user");
    u.password = colon == std::string::npos ? "" : percent_decode(userinfo.substr(colon + 1), "password");
    authority = rest.substr(at + 1);
  }
  slash = authority.find('/');
  hostport = authority.substr(0, slash);
  path = slash == std::string::npos ? "" : authority.substr(slash + 1);
}

int parse_port(const std::string& port) {
  // The text is not quoted: in a URL written wrong it may be part of a password.
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(port) < 1 || std::stoi(port) > 65535) {
    // Nor the URL: without an '@' a password in it would not be redacted.
    throw Error(Exit::config, "bad port in the AMQP URL: the text after the host's ':' is not a number from 1 to 65535",
                "write amqp://user:password@host:5672/vhost, with '/', '@' and ':' in the password "
                "percent-encoded (%2F, %40, %3A)");
  }
  return std::stoi(port);
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
  std::string hostport, path;
  split_authority(url, rest, u, hostport, path);
  std::string host = hostport;
  if (auto colon = hostport.rfind(':'); colon != std::string::npos && hostport.find(']') == std::string::npos) {
    host = hostport.substr(0, colon);
    u.port = parse_port(hostport.substr(colon + 1));
  }
  if (host.empty()) {
    throw Error(Exit::config, "no host in the AMQP URL " + redact_url(url),
                "write amqp://user:password@HOST:5672/vhost");
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
  auto at = url.rfind('@');
  if (at == std::string::npos || at < start) {
    return url;
  }
  auto colon = url.find(':', start);
  if (colon == std::string::npos || colon > at) {
    return url;  // user only, no password
  }
  return url.substr(0, colon + 1) + "***" + url.substr(at);
}

std::optional<std::string> runtime_name_problem(const std::string& name) {
  if (name.empty() || name.size() > k_max_runtime_name) {
    return "a runtime name has 1 to " + std::to_string(k_max_runtime_name) + " characters, this one " +
           std::to_string(name.size());
  }
  bool chars_ok = std::all_of(name.begin(), name.end(), [](char ch) {
    auto c = static_cast<unsigned char>(ch);
    return std::isalnum(c) || c == '.' || c == '_' || c == '+' || c == '-';
  });
  if (!chars_ok || !std::isalnum(static_cast<unsigned char>(name[0]))) {
    return "'" + name +
           "' is not a valid runtime name: use letters, digits, '.', '_', '+' and '-', starting with "
           "a letter or digit";
  }
  if (name.size() > 4 && name.ends_with(".sif")) {
    return "runtime name '" + name + "' ends in .sif";
  }
  return std::nullopt;
}

std::string runtime_name_error(const std::string& name) { return runtime_name_problem(name).value_or(""); }

std::string image_path(const Config& cfg, const Placeholders& ph) {
  const auto& rt = cfg.singularity.runtime;
  if (rt.empty()) {
    throw Error(Exit::config, "no image given and singularity.runtime is not set",
                "give --sif PATH, or set `runtime: NAME` under `singularity:` in the Lithops config "
                "(~/.lithops/config) so the image is <sif_path>/NAME.sif");
  }
  auto dir = expand(cfg.singularity.sif_path, ph);
  while (dir.size() > 1 && dir.back() == '/') {
    dir.pop_back();
  }
  return (dir == "/" ? "" : dir) + "/" + rt + ".sif";
}

std::string image_path(const Config& cfg) { return image_path(cfg, current_placeholders()); }

std::string served_runtime(const Config& cfg, const std::string& image) {
  if (!cfg.singularity.runtime.empty()) {
    return cfg.singularity.runtime;
  }
  auto slash = image.rfind('/');
  std::string name = slash == std::string::npos ? image : image.substr(slash + 1);
  if (!name.ends_with(".sif")) {
    return {};
  }
  name.resize(name.size() - 4);
  return runtime_name_problem(name) ? std::string() : name;
}

namespace {
bool is_loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || starts_with(host, "127.") ||
         host == "localhost.localdomain";
}
}  // namespace

std::vector<std::string> security_warnings(const Config& cfg) {
  std::vector<std::string> out;
  const auto& url = cfg.rabbitmq.amqp_url;
  auto url_from = to_string(cfg.origin("rabbitmq.amqp_url"));
  if (!cfg.rabbitmq.verify_peer) {
    out.push_back("rabbitmq.verify_peer = false (" + to_string(cfg.origin("rabbitmq.verify_peer")) +
                  "): the broker's certificate and host name are not checked, so whoever sits between "
                  "can read the password and the tasks; set verify_peer = true and ca_cert to your CA bundle");
  }
  if (url.empty() || !url_has_password(url)) {
    return out;
  }
  try {
    auto u = parse_amqp_url(url);
    if (!u.tls && !is_loopback(u.host)) {
      out.push_back("the broker URL " + redact_url(url) + " (" + url_from + ") sends its password in clear to " +
                    u.host + ", which is not this machine; use amqps:// (RabbitMQ's TLS listener, port 5671)");
    }
  } catch (const Error&) {
    // load() already refused a bad URL; nothing to warn about here.
  }
  return out;
}

namespace {

// Writes "key = value", and with origins "  # from <origin>".
class TomlOut {
public:
  TomlOut(const Config& c, bool with_origins) : m_c(c), m_origins(with_origins) {}
  void section(const std::string& name) {
    m_sec = name;
    m_o << (m_o.tellp() > 0 ? "\n" : "") << "[" << name << "]\n";
  }
  void kv(const std::string& key, const std::string& value) {
    m_o << key << " = " << value;
    if (m_origins) {
      m_o << "  # from " << to_string(m_c.origin(m_sec + "." + key));
    }
    m_o << "\n";
  }
  std::string str() const { return m_o.str(); }

private:
  const Config& m_c;
  bool m_origins;
  std::string m_sec;
  std::ostringstream m_o;
};

}  // namespace

std::string to_toml(const Config& c, bool with_origins, bool changed_only, int* hidden) {
  TomlOut o(c, with_origins);
  int left_out = 0;
  for (const auto& sec : schema()) {
    bool opened = false;
    for (const auto& key : sec.keys) {
      if (changed_only && c.origin(std::string(sec.name) + "." + std::string(key.name)).from == From::default_value) {
        ++left_out;
        continue;
      }
      if (!opened) {
        o.section(std::string(sec.name));
        opened = true;
      }
      o.kv(std::string(key.name), key.show(c));
    }
  }
  if (hidden) {
    *hidden = left_out;
  }
  return o.str();
}

}  // namespace lhpc::config
