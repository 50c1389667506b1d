// Container engines behind one interface: singularity, apptainer (same CLI
// family) and host (the same commands without a container). Command lines
// are built by pure functions so tests can compare them exactly; flags
// always come before the image or instance (Apptainer does not intersperse).
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
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
  // Resolved path of the engine's binary (nullopt for host); the error says
  // what to install or load (module load apptainer) when it is missing.
  virtual std::string binary() const = 0;

  // Pure command lines.
  virtual std::vector<std::string> build_argv(const std::string& out_sif, const std::string& def, bool fakeroot,
                                              bool force) const = 0;
  virtual std::vector<std::string> instance_start_argv(const InstanceSpec& spec) const = 0;
  virtual std::vector<std::string> instance_stop_argv(const std::string& name, bool force) const = 0;
  virtual std::vector<std::string> instance_list_argv(const std::string& name) const = 0;
  // CMD run inside the instance (host: CMD itself).
  virtual std::vector<std::string> exec_argv(const std::string& instance, const std::vector<std::string>& cmd) const = 0;
  virtual std::vector<std::string> run_argv(const std::string& instance) const = 0;

  // The environment for a child that must see `vars` inside the container:
  // base plus SINGULARITYENV_/APPTAINERENV_-prefixed copies (host: plain).
  // This is how the AMQP URL travels: never in argv.
  virtual Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const = 0;

  // Operations; failures throw Error(Exit::engine) with the engine's stderr tail.
  virtual void start_instance(const InstanceSpec& spec) = 0;
  virtual bool instance_alive(const std::string& name) = 0;
  // `instance stop`, then `instance stop --force` when it has not gone after `timeout`.
  virtual void stop_instance(const std::string& name, std::chrono::milliseconds timeout) = 0;
};

std::unique_ptr<Engine> make_engine(config::Engine kind);

}  // namespace lhpc::container
