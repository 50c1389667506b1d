// Configuration: the TOML file (toml++), the user's Lithops YAML
// (lithops_yaml.cc), their lookup orders and precedence, defaults, validation
// with file:line:col, the AMQP_URL override, where each value came from,
// Slurm-style placeholders, and redaction of secrets for printing.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "util/names.h"

namespace lhpc::config {

enum class Engine { singularity, apptainer, host };
enum class Transfer { mpi, sbcast, none };
enum class Mode { dispatch, runscript };
enum class GpuVendor { nvidia, amd };
// How autoalloc asks Slurm for a GPU runtime's GPUs: --gpus-per-node=N or --gres=gpu:N.
enum class GpuRequest { gpus_per_node, gres };

// Each enum's names, once: .text(value), .parse(text), and .error(text), the
// refusal every reader uses ("'x' is not one of mpi, sbcast, none"; empty
// when valid). The TOML keys and the command-line flags (cli::choice) both
// refuse through these, so a bad value reads the same wherever it was written.
inline constexpr Names<Engine, 3> k_engine_names{
    {{{Engine::singularity, "singularity"}, {Engine::apptainer, "apptainer"}, {Engine::host, "host"}}}};
inline constexpr Names<Transfer, 3> k_transfer_names{
    {{{Transfer::mpi, "mpi"}, {Transfer::sbcast, "sbcast"}, {Transfer::none, "none"}}}};
inline constexpr Names<Mode, 2> k_mode_names{{{{Mode::dispatch, "dispatch"}, {Mode::runscript, "runscript"}}}};
inline constexpr Names<GpuVendor, 2> k_gpu_vendor_names{{{{GpuVendor::nvidia, "nvidia"}, {GpuVendor::amd, "amd"}}}};
inline constexpr Names<GpuRequest, 2> k_gpu_request_names{
    {{{GpuRequest::gpus_per_node, "gpus-per-node"}, {GpuRequest::gres, "gres"}}}};
// logs.dir and --logs-dir: "node", "state" or an absolute path; empty when valid.
std::string logs_dir_error(const std::string& text);

struct Singularity {
  std::string sif_path = "/tmp";  // staged images go under here; placeholders
  std::string runtime;            // image name: <sif_path>/<runtime>.sif
  Engine engine = Engine::singularity;
  bool fakeroot = false;
  bool nv = false;  // --nv: NVIDIA GPUs inside the instance
  std::string instance_name = "lithops-worker";
  std::vector<std::string> binds;  // "SRC[:DST[:OPTS]]"
  int worker_processes = 0;        // slots per node; 0 = the node's cores
  // GPUs each slot owns (gpu/slots.h); 0: a CPU runtime. A GPU runtime takes
  // as many slots as whole groups of its GPUs fit (worker_processes may lower it).
  int gpus_per_slot = 0;
  GpuVendor gpu_vendor = GpuVendor::nvidia;
  std::string python = "python3";  // interpreter that runs the handler
};

struct Rabbitmq {
  std::string amqp_url;  // secret: never logged unredacted
  std::string queue = "task_queue";
  int heartbeat = 60;       // seconds; 0 disables
  std::string ca_cert;      // amqps: CA bundle; empty = system default
  bool verify_peer = true;  // amqps: check the broker's certificate
  // Bounds on a task message, checked before it is parsed (dispatch/protocol.h).
  int max_message_bytes = 16 << 20;
  int max_message_depth = 64;
  // The broker's consumer_timeout in seconds, as its operator set it (AMQP
  // cannot ask); 0: unknown. Only `config check` reads it.
  int consumer_timeout = 0;
};

struct Deploy {
  Transfer transfer = Transfer::mpi;
  int chunk_mib = 8;
  bool compress = false;  // sbcast --compress
  bool cleanup = false;   // remove staged images at the end
  Mode mode = Mode::dispatch;
  double drain_timeout = 60;      // seconds for running tasks to finish on stop
  double drain_before_end = 120;  // drain when Slurm time left drops under this
  int min_ranks = 0;              // 0: every rank must start
  double start_timeout = 300;     // seconds: ranks joining, workers becoming ready
  int restart_limit = 5;          // instance/runscript restarts before a rank fails
};

struct Health {
  double interval = 5;      // seconds between reports to rank 0
  std::string status_file;  // empty: <state dir>/jobs/<jobid>/status.json
  // Seconds an ended deployment's directory under <state dir>/jobs (status,
  // stop request, logs kept there) stays after its last update; 0: forever.
  double keep_ended = 7 * 86400;
};

// Where handler output (Lithops' logging, what functions print) goes, and
// rank 0's progress line in the job output (see lithops-hpc.toml(5) [logs]).
struct Logs {
  std::string dir = "node";       // node | state | an absolute path (placeholders)
  int max_bytes = 64 << 20;       // per rank file; rotated once to .1 past it
  double progress_interval = 60;  // seconds between progress lines; 0: none
};

// `lithops-hpc autoalloc`: the controller that submits deployments as the
// queue needs them (see lithops-hpc.toml(5) [autoalloc]).
struct Autoalloc {
  std::string sif;     // image each deployment serves; empty: $LITHOPS_SIF
  std::string script;  // sbatch template; empty: the installed lithops-deploy.sh
  int max_nodes = 4;   // held: running and pending together
  int nodes_per_job = 1;
  int max_pending = 1;
  int min_nodes = 0;
  double idle_timeout = 300;
  std::string time_limit = "1:00:00";  // sbatch --time
  double renew_before = 300;
  double poll = 10;
  int max_start_failures = 3;
  bool drain_on_exit = false;
  std::vector<std::string> sbatch_args;                // e.g. ["--partition=compute", "--account=P"]
  GpuRequest gpu_request = GpuRequest::gpus_per_node;  // a GPU runtime's GPUs: --gpus-per-node or --gres=gpu:
  // Runtimes served besides singularity.runtime, each by <sif_path>/<name>.sif.
  std::vector<std::string> runtimes;
};

// Where an effective value came from (`config check` prints it). Precedence,
// strongest first: flag, environment (AMQP_URL), lithops-hpc TOML, Lithops
// YAML, default.
enum class From { default_value, lithops_yaml, toml, environment, flag };
struct Origin {
  From from = From::default_value;
  std::string where;  // file:line, the variable or the flag; empty for defaults
};
// "default", "/home/u/.lithops/config:4", "environment (AMQP_URL)", "flag --sif".
std::string to_string(const Origin& o);

// The user's Lithops config as the Lithops client reads it: the input of the
// client-side checks of `config check`. Only the keys those checks need.
struct LithopsClient {
  struct Value {
    std::string text;
    int line = 0;  // 1-based line in `source`; 0 when unknown
  };
  std::string source;                       // file or "LITHOPS_CONFIG (environment)"; empty: none found
  std::optional<Value> backend;             // lithops.backend
  std::optional<Value> storage;             // lithops.storage
  std::optional<Value> log_level;           // lithops.log_level (Lithops' default: INFO)
  std::optional<Value> execution_timeout;   // lithops.execution_timeout, seconds (Lithops' default: 1800)
  std::optional<Value> runtime;             // singularity.runtime
  std::optional<Value> amqp_url;            // rabbitmq.amqp_url (secret)
  std::optional<Value> worker_processes;    // singularity.worker_processes: calls per message
  std::string where(const Value& v) const;  // "source:line"
};

struct Config {
  Singularity singularity;
  Rabbitmq rabbitmq;
  Deploy deploy;
  Health health;
  Logs logs;
  Autoalloc autoalloc;
  std::string source;                 // TOML file it came from; empty: none
  std::vector<std::string> warnings;  // e.g. a readable file holding a password
  bool amqp_url_from_env = false;
  std::map<std::string, Origin> origins;  // "section.key" -> origin; absent: the default
  LithopsClient lithops;

  Origin origin(const std::string& key) const;
  // Records that a command-line flag set `key` (call after assigning it).
  void set_by_flag(const std::string& key, const std::string& flag);
};

// Where the configuration comes from: --config wins, then $LITHOPS_HPC_CONFIG,
// $XDG_CONFIG_HOME/lithops-hpc/config.toml (or ~/.config/...),
// /etc/lithops-hpc/config.toml. No file at all is fine: defaults.
std::optional<std::string> find_config_file(const std::string& explicit_path);

// Where the user's Lithops config is, in Lithops' own order (lithops/config.py
// get_default_config_filename): $LITHOPS_CONFIG_FILE (even when missing: the
// client then runs in localhost mode), ./.lithops_config, ~/.lithops/config,
// /etc/lithops/config. ($LITHOPS_CONFIG, JSON text, wins over all: load reads it.)
std::optional<std::string> find_lithops_config();

// Loads and validates the Lithops YAML, then the TOML over it, then AMQP_URL
// over both; throws lhpc::Error(Exit::config) naming file:line:col and the
// key. Every file is read by read_config_file's rules.
Config load(const std::string& explicit_path);
// Parsers of bytes (no lookup, no environment): the TOML over `base`, and
// the Lithops YAML over `base` (lithops_yaml.cc).
Config parse(const std::string& toml_text, const std::string& source_name, Config base = {});
Config parse_lithops_yaml(const std::string& yaml_text, const std::string& source_name, Config base = {});
// A configuration file's bytes, by util/fs's trust rules (read_trusted_file):
// a regular file of yours or root's that others cannot write, in directories
// only you or root control, at most k_max_config_bytes; /dev/null is empty.
// Throws Error(Exit::config) naming the file and why it was not read.
std::string read_config_file(const std::string& path, const std::string& what);

// Checks of the effective values that are warnings, not errors: TLS checks
// off, a password sent in clear to a host that is not loopback.
std::vector<std::string> security_warnings(const Config& cfg);

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
// sif_path, status_file, logs.dir and binds with placeholders expanded.
Config expanded(const Config& cfg, const Placeholders& ph);

// "The image path": what deploy, worker, the sbatch template and autoalloc run
// when no image is given: <sif_path>/<runtime>.sif, placeholders expanded (as
// Lithops names it). Throws Error(Exit::config) saying where to set
// singularity.runtime when it is unset.
std::string image_path(const Config& cfg, const Placeholders& ph);
std::string image_path(const Config& cfg);  // with current_placeholders()

// The Lithops runtime a deployment of `image` serves (its tasks and
// get_metadata, never another's): singularity.runtime when set (--runtime,
// TOML, then the Lithops config), else the image's file name without .sif
// when that is a valid runtime name; empty (every runtime) otherwise, which
// only the host engine without a runtime gives.
std::string served_runtime(const Config& cfg, const std::string& image);

// Runtime names are file names: 1 to 200 of [A-Za-z0-9._+-], starting with a
// letter or digit, without .sif. Empty optional when fine, else what is wrong.
std::optional<std::string> runtime_name_problem(const std::string& name);
// The same for a flag's check (cli::choice): empty when valid.
std::string runtime_name_error(const std::string& name);

struct AmqpUrl {
  bool tls = false;
  std::string user = "guest";
  std::string password = "guest";
  std::string host = "localhost";
  int port = 5672;
  std::string vhost = "/";
};
// amqp[s]://[user[:password]@]host[:port][/vhost], percent-decoding as the
// AMQP URI spec says. Throws Error(Exit::config) with what is wrong, never
// quoting the password (also when it holds a raw '/', '?' or '#').
AmqpUrl parse_amqp_url(const std::string& url);
// amqp://user:***@host:port/vhost — the only form a URL is ever printed in.
// Whatever lies between the first ':' after the scheme and the last '@' is
// hidden, so a password holding raw '/', '@' or ':' is never shown.
std::string redact_url(const std::string& url);
// True when the URL names a password of its own (user:password@).
bool url_has_password(const std::string& url);

// Throws Error(Exit::config) saying where to set it when no broker URL is configured.
void require_amqp_url(const Config& cfg);

// The effective configuration as TOML, secrets redacted; with_origins: each
// value followed by "# from <origin>" (config check). changed_only: only the
// keys set somewhere (not at their defaults), and only the sections holding
// one; `*hidden` (when given) counts the keys left out.
std::string to_toml(const Config& cfg, bool with_origins = false, bool changed_only = false, int* hidden = nullptr);

// The short hostname (up to the first dot).
std::string short_hostname();

}  // namespace lhpc::config
