// What `lithops-hpc up` started and where, kept between `up`, `status` and
// `down`: <state dir>/services/services.json (0700 directory, no secrets;
// the passwords stay in 0600 files of the broker's and the store's own
// directories). The host it names is how a second `up` on another login node
// knows where the first one runs (the state directory is in the shared home).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace lhpc::services {

struct Record {
  std::string host;      // where `up` ran (the services listen there)
  std::string data_dir;  // holds rabbitmq/ and redis/
  bool running = false;  // false once `down` stopped them
  double updated = 0;
  bool broker_managed = false;  // false: the site's broker (--broker-url)
  std::string storage = "redis";
  bool redis_managed = false;
  int redis_port = 0;
  std::string bind;                       // empty: loopback only
  std::string tls_cert, tls_key, tls_ca;  // up's --tls-*: the broker's and the store's (absolute paths)
  std::uint64_t redis_maxmemory = 0;      // bytes
  long controller_pid = 0;
  std::string controller_log;
  std::string lithops_config;  // the file `up` wrote
};

// <state dir>/services
std::string services_dir();
std::string broker_dir(const Record& r);  // <data_dir>/rabbitmq
std::string redis_dir(const Record& r);   // <data_dir>/redis

std::string to_json(const Record& r);
// Throws Error(failure) naming `source` when the text is not a record.
Record record_from_json(const std::string& text, const std::string& source);
std::optional<Record> load_record();
void save_record(const Record& r);

// The name this host goes by in the record: $LITHOPS_HPC_NODE_ID, else the
// short hostname (as everywhere in lithops-hpc).
std::string this_host();

}  // namespace lhpc::services
