// Container engines behind one interface: singularity, apptainer (same CLI
// family) and host (the same commands without a container). Command lines
// are built by pure functions so tests can compare them exactly; flags
// always come before the image or instance (Apptainer does not intersperse:
// anything after the image belongs to the container's command).
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "util/process.h"

namespace lhpc::container {

// What one release of an engine's CLI offers, read from `ENGINE version`.
struct EngineFeatures {
  // `exec/run --no-eval`: *ENV_ values are exported single-quoted instead of
  // being shell-evaluated inside the container (Apptainer >= 1.1.0,
  // SingularityCE >= 3.10.0; cmd/internal/cli/action_flags.go).
  bool no_eval = false;
  // `--no-oci` on instance start/exec/run: SingularityCE >= 4 only. Set once
  // `oci mode = yes` in singularity.conf refused an instance start.
  bool no_oci = false;
};

// Features of `kind` at `version` as printed by `ENGINE version` ("1.5.3",
// "4.5.1-noble", "3.8.7-1.el8"). A `singularity` that reports 1.x is
// Apptainer's compatibility link and is judged as Apptainer. A version that
// cannot be read gets no optional feature (the safe side: escaping).
EngineFeatures features_for(config::Engine kind, const std::string& version);

// A value as it must be written so that the engine's `export KEY="VALUE"`
// (evaluated inside the container when --no-eval is not available) yields
// it unchanged: `\`, `$` and backtick escaped; the engine escapes `"` itself
// (Apptainer internal/pkg/runtime/engine/apptainer/process_linux.go).
std::string escape_for_engine_eval(const std::string& value);

// The environment for an engine command that runs nothing of ours inside
// the container (instance start/list/stop, build): `base` without the
// broker URL in any form (AMQP_URL, SINGULARITYENV_AMQP_URL,
// APPTAINERENV_AMQP_URL). `instance start` would otherwise carry it into the
// instance's own environment.
Env engine_command_env(const Env& base);

// A bind path the engines would split: they take `,` as the separator of
// several binds and `:` as the one of SRC:DST:OPTS (Apptainer
// pkg/runtime/engine/apptainer/config/bind.go, ParseBindPath; their escapes
// are partial and differ between releases). Throws Error(Exit::config)
// naming the path and `where` (e.g. "singularity.binds").
void check_bind_path(const std::string& path, const std::string& where);

struct InstanceSpec {
  std::string image;  // path of the verified .sif
  std::string name;   // <instance_name>-<jobid>-<rank>, ^[a-zA-Z0-9._-]+$
  bool fakeroot = false;
  // The GPU driver switches of instance start (gpu::engine_flags): "--nv"
  // (with "--nvccli" where configured), "--rocm"; empty: none.
  std::vector<std::string> gpu;
  std::vector<std::string> binds;  // "SRC[:DST[:OPTS]]"
};

class Engine {
public:
  virtual ~Engine() = default;
  virtual config::Engine kind() const = 0;
  virtual std::string name() const = 0;  // "singularity", "apptainer", "host"
  // Absolute path of the engine's program, found in PATH; throws
  // Error(Exit::engine) saying what to load (module load apptainer) when it
  // is missing. Host: "" (there is no program to find).
  virtual std::string binary() const = 0;

  // Pure command lines. argv[0] is the engine's name (spawn() finds it in
  // PATH, as binary() does). The host engine has nothing to run for the
  // instance commands (empty vector) and cannot build (throws Exit::config).
  virtual std::vector<std::string> build_argv(const std::string& out_sif, const std::string& def, bool fakeroot,
                                              bool force) const = 0;
  virtual std::vector<std::string> instance_start_argv(const InstanceSpec& spec) const = 0;
  // `timeout_s` > 0 adds `--timeout N`: the engine's own SIGKILL after N s
  // (the engines default to 10 s).
  virtual std::vector<std::string> instance_stop_argv(const std::string& name, bool force, int timeout_s = 0) const = 0;
  virtual std::vector<std::string> instance_list_argv(const std::string& name) const = 0;
  // CMD run inside the instance (host: CMD itself); with --no-eval when the
  // engine has it (see features()).
  virtual std::vector<std::string> exec_argv(const std::string& instance,
                                             const std::vector<std::string>& cmd) const = 0;
  // The image's %runscript in the instance; host: throws Error(Exit::config).
  virtual std::vector<std::string> run_argv(const std::string& instance) const = 0;

  // What this engine's release offers: read once from `ENGINE version`
  // (throws like binary() when it is missing); host: nothing.
  virtual EngineFeatures features() const = 0;
  // Takes `version` as the release instead of asking the engine: for
  // computing command lines where the engine is not installed (tests).
  virtual void set_version(const std::string& version) = 0;

  // The environment for a child that must see `vars` inside the container.
  // Container engines: base plus <PREFIX>ENV_<KEY> (SINGULARITYENV_,
  // APPTAINERENV_), with the plain KEY removed: the engines pass the host
  // environment through, so a plain copy would reach the container a second
  // time and sit in the engine's own environment. Without --no-eval the
  // values are escaped (escape_for_engine_eval) so they arrive unchanged.
  // Host: the vars plainly. This is how the AMQP URL travels: never in argv.
  virtual Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const = 0;

  // Operations (blocking, bounded by deadlines); failures throw
  // Error(Exit::engine) with the engine's stderr tail.
  // `instance start`, then confirms with `instance list --json NAME`.
  virtual void start_instance(const InstanceSpec& spec) = 0;
  // Whether `instance list --json NAME` shows it (host: started and not stopped).
  virtual bool instance_alive(const std::string& name) = 0;
  // `instance stop --timeout N` with N below `timeout`, so the engine's own
  // SIGKILL comes first; then `instance stop --force` when it has still not
  // gone after `timeout`; throws when even that leaves it running.
  virtual void stop_instance(const std::string& name, std::chrono::milliseconds timeout) = 0;
};

// The engine `kind` names. Finding its program is deferred to binary() and
// the operations, so command lines can be computed where it is not installed.
std::unique_ptr<Engine> make_engine(config::Engine kind);

// The directory holding the bundled definitions and handler.py: next to an
// installed binary (<prefix>/share/lithops-hpc/runtime-defs), the source
// tree's runtime-defs/ when run from a meson build tree, else LHPC_DATADIR.
// Throws Error(Exit::failure) naming the places it looked.
std::string find_runtime_defs_dir();

namespace detail {
// The implementations make_engine() picks from (singularity.cc, host.cc).
std::unique_ptr<Engine> make_singularity_family(config::Engine kind);
std::unique_ptr<Engine> make_host();
}  // namespace detail

}  // namespace lhpc::container
