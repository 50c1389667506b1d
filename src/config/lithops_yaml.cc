// The user's Lithops config (YAML, yaml-cpp): where Lithops looks for it, the
// keys that mean the same for the Lithops client and for lithops-hpc's workers
// (singularity.sif_path, singularity.runtime, rabbitmq.amqp_url), and the ones
// the client-side checks of `config check` need. Everything else in the file
// belongs to Lithops and is left alone.
#include <yaml-cpp/yaml.h>

#include <array>
#include <cstdlib>

#include "config/config.h"
#include "config/text_guard.h"
#include "util/error.h"
#include "util/fs.h"

namespace lhpc::config {

namespace {

std::string at(const std::string& source, const YAML::Mark& m) {
  return source + ":" + std::to_string(m.line + 1) + ":" + std::to_string(m.column + 1);
}

const char* type_name(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "nothing (null)";
    default: return "a scalar";
  }
}

// What PyYAML's safe_load (YAML 1.1) turns a plain scalar into, when it is
// not a string: Lithops would see a bool, null or a number there.
const char* plain_non_string(const std::string& v) {
  // PyYAML's bool resolver (YAML 1.1 without y/n).
  static const std::array<const char*, 18> words = {"yes",   "Yes",   "YES",   "no", "No", "NO", "true", "True", "TRUE",
                                                    "false", "False", "FALSE", "on", "On", "ON", "off",  "Off",  "OFF"};
  for (const char* w : words) {
    if (v == w) {
      return "a boolean";
    }
  }
  if (v.empty() || v == "~" || v == "null" || v == "Null" || v == "NULL") {
    return "nothing (null)";
  }
  bool digit = false;
  bool other = false;
  for (std::size_t i = 0; i < v.size(); ++i) {
    char c = v[i];
    if (c >= '0' && c <= '9') {
      digit = true;
    } else if (!(c == '.' || c == '_' || c == 'e' || c == 'E' ||
                 ((c == '+' || c == '-') && (i == 0 || v[i - 1] == 'e' || v[i - 1] == 'E')))) {
      other = true;
    }
  }
  return digit && !other ? "a number" : nullptr;
}

// A value lithops-hpc reads: a scalar (or, with `string_only`, a string as
// Lithops would see it). Null and absent are both "not set".
std::optional<LithopsClient::Value> read_value(const YAML::Node& sec, const std::string& sec_name, const char* key,
                                               const std::string& source, bool string_only) {
  auto n = sec[key];
  if (!n || n.IsNull()) {
    return std::nullopt;
  }
  std::string full = sec_name + "." + key;
  if (!n.IsScalar()) {
    throw Error(Exit::config,
                at(source, n.Mark()) + ": " + full + ": wrong type: expected a string, got " + type_name(n),
                "write it as `" + std::string(key) + ": value` under `" + sec_name + ":`");
  }
  auto text = n.Scalar();
  if (string_only && n.Tag() == "?") {
    if (const char* got = plain_non_string(text)) {
      throw Error(Exit::config, at(source, n.Mark()) + ": " + full + ": wrong type: expected a string, got " + got,
                  "put the value in quotes");
    }
  }
  return LithopsClient::Value{text, n.Mark().line + 1};
}

YAML::Node section(const YAML::Node& root, const char* name, const std::string& source) {
  auto n = root[name];
  if (n && !n.IsNull() && !n.IsMap()) {
    throw Error(
        Exit::config,
        at(source, n.Mark()) + ": " + name + ": expected a mapping (keys under `" + name + ":`), got " + type_name(n),
        "see the Lithops documentation of its config file");
  }
  return n && n.IsMap() ? n : YAML::Node(YAML::NodeType::Map);
}

YAML::Node load_root(const std::string& yaml_text, const std::string& source) {
  check_text(yaml_text, source);
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw Error(Exit::config, at(source, e.mark) + ": " + e.msg, "fix the YAML syntax at that position");
  }
  if (root && !root.IsNull() && !root.IsMap()) {
    throw Error(Exit::config, source + ": the Lithops config must be a mapping of sections, got " + type_name(root),
                "write it as `lithops:`, `singularity:`, `rabbitmq:` ... each with its keys indented below");
  }
  return root;
}

}  // namespace

std::optional<std::string> find_lithops_config() {
  if (const char* f = std::getenv("LITHOPS_CONFIG_FILE"); f) {
    return std::string(f);
  }
  for (const auto& cand :
       {std::string(".lithops_config"), home_dir() + "/.lithops/config", std::string("/etc/lithops/config")}) {
    if (path_exists(cand)) {
      return cand;
    }
  }
  return std::nullopt;
}

Config parse_lithops_yaml(const std::string& yaml_text, const std::string& source_name, Config cfg) {
  auto root = load_root(yaml_text, source_name);
  YAML::Node empty(YAML::NodeType::Map);
  const auto& r = root && root.IsMap() ? root : empty;
  auto lithops = section(r, "lithops", source_name);
  auto sing = section(r, "singularity", source_name);
  auto rabbit = section(r, "rabbitmq", source_name);

  LithopsClient l;
  l.source = source_name;
  l.backend = read_value(lithops, "lithops", "backend", source_name, false);
  l.storage = read_value(lithops, "lithops", "storage", source_name, false);
  l.log_level = read_value(lithops, "lithops", "log_level", source_name, false);
  l.execution_timeout = read_value(lithops, "lithops", "execution_timeout", source_name, false);
  l.worker_processes = read_value(sing, "singularity", "worker_processes", source_name, false);
  l.runtime = read_value(sing, "singularity", "runtime", source_name, true);
  l.amqp_url = read_value(rabbit, "rabbitmq", "amqp_url", source_name, true);
  auto sif_path = read_value(sing, "singularity", "sif_path", source_name, true);

  auto fail = [&](const char* key, const LithopsClient::Value& v, const std::string& what, const std::string& hint) {
    throw Error(Exit::config, l.where(v) + ": " + key + ": " + what, hint);
  };
  if (l.runtime && l.runtime->text != "default") {
    if (auto problem = runtime_name_problem(l.runtime->text)) {
      fail("singularity.runtime", *l.runtime, *problem, "the image is <sif_path>/<runtime>.sif");
    }
  }
  if (l.amqp_url) {
    try {
      parse_amqp_url(l.amqp_url->text);
    } catch (const Error& e) {
      fail("rabbitmq.amqp_url", *l.amqp_url, e.what(), e.hint());
    }
  }
  if (sif_path) {
    cfg.singularity.sif_path = sif_path->text;
    cfg.origins["singularity.sif_path"] = {From::lithops_yaml, l.where(*sif_path)};
  }
  // "default" is Lithops' word for its own image name: nothing to map.
  if (l.runtime && l.runtime->text != "default") {
    cfg.singularity.runtime = l.runtime->text;
    cfg.origins["singularity.runtime"] = {From::lithops_yaml, l.where(*l.runtime)};
  }
  if (l.amqp_url) {
    cfg.rabbitmq.amqp_url = l.amqp_url->text;
    cfg.origins["rabbitmq.amqp_url"] = {From::lithops_yaml, l.where(*l.amqp_url)};
  }
  cfg.lithops = std::move(l);
  return cfg;
}

}  // namespace lhpc::config
