#include "services/record.h"

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "config/config.h"
#include "util/error.h"
#include "util/fs.h"

namespace lhpc::services {

std::string services_dir() { return state_dir() + "/services"; }
std::string broker_dir(const Record& r) { return r.data_dir + "/rabbitmq"; }
std::string redis_dir(const Record& r) { return r.data_dir + "/redis"; }

std::string this_host() {
  if (const char* n = std::getenv("LITHOPS_HPC_NODE_ID"); n && *n) {
    return n;
  }
  return config::short_hostname();
}

std::string to_json(const Record& r) {
  nlohmann::ordered_json j = {
      {"host", r.host},
      {"data_dir", r.data_dir},
      {"running", r.running},
      {"updated", r.updated},
      {"broker_managed", r.broker_managed},
      {"storage", r.storage},
      {"redis_managed", r.redis_managed},
      {"redis_port", r.redis_port},
      {"bind", r.bind},
      {"tls_cert", r.tls_cert},
      {"tls_key", r.tls_key},
      {"tls_ca", r.tls_ca},
      {"redis_maxmemory", r.redis_maxmemory},
      {"controller_pid", r.controller_pid},
      {"controller_log", r.controller_log},
      {"lithops_config", r.lithops_config},
  };
  return j.dump(2) + "\n";
}

Record record_from_json(const std::string& text, const std::string& source) {
  try {
    auto j = nlohmann::json::parse(text);
    Record r;
    r.host = j.at("host").get<std::string>();
    r.data_dir = j.at("data_dir").get<std::string>();
    r.running = j.value("running", false);
    r.updated = j.value("updated", 0.0);
    r.broker_managed = j.value("broker_managed", false);
    r.storage = j.value("storage", std::string("redis"));
    r.redis_managed = j.value("redis_managed", false);
    r.redis_port = j.value("redis_port", 0);
    r.bind = j.value("bind", std::string());
    r.tls_cert = j.value("tls_cert", std::string());
    r.tls_key = j.value("tls_key", std::string());
    r.tls_ca = j.value("tls_ca", std::string());
    r.redis_maxmemory = j.value("redis_maxmemory", std::uint64_t{0});
    r.controller_pid = j.value("controller_pid", 0L);
    r.controller_log = j.value("controller_log", std::string());
    r.lithops_config = j.value("lithops_config", std::string());
    return r;
  } catch (const nlohmann::json::exception& e) {
    throw Error(Exit::failure, source + ": not a services record: " + e.what(),
                "remove it if no `lithops-hpc up` services run (they are then stopped by hand)");
  }
}

std::optional<Record> load_record() {
  auto path = services_dir() + "/services.json";
  auto text = read_private_file(path, 1 << 20);
  if (!text) {
    return std::nullopt;
  }
  return record_from_json(*text, path);
}

void save_record(const Record& r) {
  make_private_dir(services_dir());
  write_file_atomic(services_dir() + "/services.json", to_json(r), 0600);
}

}  // namespace lhpc::services
