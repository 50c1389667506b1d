// Configuration: the TOML file (toml++), its lookup order, defaults,
// validation with file:line:col, the AMQP_URL override, Slurm-style
// placeholders, and redaction of secrets for printing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lhpc::config {

enum class Engine { singularity, apptainer, host };
enum class Transfer { mpi, sbcast, none };
enum class Mode { dispatch, runscript };

std::string to_string(Engine);
std::string to_string(Transfer);
std::string to_string(Mode);
std::optional<Engine> parse_engine(const std::string&);
std::optional<Transfer> parse_transfer(const std::string&);
std::optional<Mode> parse_mode(const std::string&);
// Why `text` names no value of the enum, in the words every refusal uses
// ("'x' is not one of mpi, sbcast, none"); empty when it is valid. The TOML
// keys and the command-line flags (a CLI11 check) both refuse through these,
// so a bad value reads the same wherever it was written.
std::string engine_error(const std::string& text);
std::string transfer_error(const std::string& text);
std::string mode_error(const std::string& text);

struct Singularity {
  std::string sif_path = "/tmp";              // staged images go under here; placeholders
  std::string runtime;                        // image name: <sif_path>/<runtime>.sif
  Engine engine = Engine::singularity;
  bool fakeroot = false;
  bool nv = false;                            // --nv: NVIDIA GPUs inside the instance
  std::string instance_name = "lithops-worker";
  std::vector<std::string> binds;             // "SRC[:DST[:OPTS]]"
  int worker_processes = 0;                   // slots per node; 0 = the node's cores
  std::string python = "python3";             // interpreter that runs the handler
};

struct Rabbitmq {
  std::string amqp_url;                       // secret: never logged unredacted
  std::string queue = "task_queue";
  int heartbeat = 60;                         // seconds; 0 disables
  std::string ca_cert;                        // amqps: CA bundle; empty = system default
  bool verify_peer = true;                    // amqps: check the broker's certificate
};

struct Deploy {
  Transfer transfer = Transfer::mpi;
  int chunk_mib = 8;
  bool compress = false;                      // sbcast --compress
  bool cleanup = false;                       // remove staged images at the end
  Mode mode = Mode::dispatch;
  double drain_timeout = 60;                  // seconds for running tasks to finish on stop
  double drain_before_end = 120;              // drain when Slurm time left drops under this
  int min_ranks = 0;                          // 0: every rank must start
  double start_timeout = 300;                 // seconds: ranks joining, workers becoming ready
  int restart_limit = 5;                      // instance/runscript restarts before a rank fails
};

struct Health {
  double interval = 5;                        // seconds between reports to rank 0
  std::string status_file;                    // empty: <state dir>/jobs/<jobid>/status.json
};

struct Config {
  Singularity singularity;
  Rabbitmq rabbitmq;
  Deploy deploy;
  Health health;
  std::string source;                         // file it came from; empty: defaults only
  std::vector<std::string> warnings;          // e.g. a readable file holding a password
  bool amqp_url_from_env = false;
};

// Where the configuration comes from: --config wins, then $LITHOPS_HPC_CONFIG,
// $XDG_CONFIG_HOME/lithops-hpc/config.toml (or ~/.config/...),
// /etc/lithops-hpc/config.toml. No file at all is fine: defaults.
std::optional<std::string> find_config_file(const std::string& explicit_path);

// Loads and validates; throws lhpc::Error(Exit::config) naming file:line:col
// and the key. `AMQP_URL` in the environment overrides rabbitmq.amqp_url.
Config load(const std::string& explicit_path);
Config parse(const std::string& toml_text, const std::string& source_name);

struct Placeholders {
  std::string jobid;  // %j
  std::string node;   // %n
  std::string user;   // %u
};
// Values for this process: $SLURM_JOB_ID (else $LITHOPS_HPC_JOB_ID, else
// "local"), $LITHOPS_HPC_NODE_ID or the short hostname, the user name.
Placeholders current_placeholders();
// %j %n %u %% as in Slurm's filename patterns; an unknown %x is an error.
std::string expand(const std::string& pattern, const Placeholders& ph);
// sif_path, status_file and binds with placeholders expanded.
Config expanded(const Config& cfg, const Placeholders& ph);

struct AmqpUrl {
  bool tls = false;
  std::string user = "guest";
  std::string password = "guest";
  std::string host = "localhost";
  int port = 5672;
  std::string vhost = "/";
};
// amqp[s]://[user[:password]@]host[:port][/vhost], percent-decoding as the
// AMQP URI spec says. Throws Error(Exit::config) with what is wrong.
AmqpUrl parse_amqp_url(const std::string& url);
// amqp://user:***@host:port/vhost — the only form a URL is ever printed in.
std::string redact_url(const std::string& url);

// Throws Error(Exit::config) saying where to set it when no broker URL is configured.
void require_amqp_url(const Config& cfg);

// The effective configuration as TOML, secrets redacted (config check).
std::string to_toml(const Config& cfg);

// The short hostname (up to the first dot).
std::string short_hostname();

}  // namespace lhpc::config
