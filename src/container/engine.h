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

struct InstanceSpec {
  std::string image;                 // path of the verified .sif
  std::string name;                  // <instance_name>-<jobid>-<rank>, ^[a-zA-Z0-9._-]+$
  bool fakeroot = false;
  bool nv = false;
  std::vector<std::string> binds;    // "SRC[:DST[:OPTS]]"
};

class Engine {
public:
  virtual ~Engine() = default;
  virtual config::Engine kind() const = 0;
  virtual std::string name() const = 0;             // "singularity", "apptainer", "host"
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
  virtual std::vector<std::string> instance_stop_argv(const std::string& name, bool force) const = 0;
  virtual std::vector<std::string> instance_list_argv(const std::string& name) const = 0;
  // CMD run inside the instance (host: CMD itself).
  virtual std::vector<std::string> exec_argv(const std::string& instance, const std::vector<std::string>& cmd) const = 0;
  // The image's %runscript in the instance; host: throws Error(Exit::config).
  virtual std::vector<std::string> run_argv(const std::string& instance) const = 0;

  // The environment for a child that must see `vars` inside the container.
  // Container engines: base plus <PREFIX>ENV_<KEY> (SINGULARITYENV_,
  // APPTAINERENV_), with the plain KEY removed: the engines pass the host
  // environment through, so a plain copy would reach the container a second
  // time and sit in the engine's own environment. Host: the vars plainly.
  // This is how the AMQP URL travels: never in argv.
  virtual Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const = 0;

  // Operations (blocking, bounded by deadlines); failures throw
  // Error(Exit::engine) with the engine's stderr tail.
  // `instance start`, then confirms with `instance list --json NAME`.
  virtual void start_instance(const InstanceSpec& spec) = 0;
  // Whether `instance list --json NAME` shows it (host: started and not stopped).
  virtual bool instance_alive(const std::string& name) = 0;
  // `instance stop`, then `instance stop --force` when it has not gone after
  // `timeout`; throws when even that leaves it running.
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
