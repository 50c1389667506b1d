// `lithops-hpc up` and `down`: the services a Lithops user needs on the node
// where they run (the broker, a Redis for Lithops' storage, the autoalloc
// controller in the background), their connection settings written into the
// user's Lithops config, and the services line of `status`. Idempotent: what
// runs is left alone, what died is started again with the same ports and
// passwords, so the written config stays valid. One `up` per user: a second
// one on another host is refused, naming where the first one runs.
// Not here: the local scheduler of `--local` (the controller's own ports:
// up only starts `autoalloc --local`).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace lhpc::services {

struct UpOptions {
  std::string data_dir;           // --data-dir; empty: as before, else <state dir>/services
  std::string broker_url;         // --broker-url: the site's ("-": one line on stdin)
  std::string storage = "redis";  // --storage: another name keeps the store configured for it
  std::string bind;               // --bind: both services on this address (plain: trusted networks)
  std::string tls_cert, tls_key, tls_ca;
  std::uint64_t storage_memory = 0;  // --storage-memory, bytes; 0: a quarter of memory within [256 MiB, 8 GiB]
  bool takeover = false;             // --takeover: the host in the record is gone
  // The controller (started when `sif` is set).
  std::string self;         // this executable
  std::string config_path;  // --config given to up, handed on
  std::string sif;
  int max_nodes = -1;
  bool local = false;                    // --local: `autoalloc --local`, deployments on this machine
  std::vector<std::string> sbatch_args;  // with `local`: mpirun's
};

// Starts what is missing; returns what to print (what runs, logs, the line
// to try). Throws Error for what the user can fix (missing servers, another
// host, a network file system, an unwritable Lithops config).
std::string up(const UpOptions& o);

// Stops the controller, then `stop_deployments` (drains them through the
// broker), then the store and the broker; without `keep_data` their data
// (queues, stored objects) goes too, ports and passwords stay. Returns what
// to print.
std::string down(bool keep_data, const std::function<void()>& stop_deployments);

// The services line of `status` (nullopt when `up` never ran).
std::optional<std::string> status_line(const std::string& queue);

// Default maxmemory for `mem_total` bytes of memory (pure, for tests).
std::uint64_t default_storage_memory(std::uint64_t mem_total);
// f_type values of file systems where RabbitMQ's data must not live (NFS,
// Lustre, GPFS, CIFS, Ceph, AFS); pure, for tests.
bool is_network_fs(long f_type);

}  // namespace lhpc::services
