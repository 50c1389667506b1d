// The host engine: the same commands without a container, for sites with a
// shared Python environment and for machines without Singularity (this
// project's test rig). There is no instance: "started" is bookkeeping.
#include <set>

#include "container/engine.h"
#include "util/error.h"

namespace lhpc::container {

namespace {

class HostEngine final : public Engine {
public:
  config::Engine kind() const override { return config::Engine::host; }
  std::string name() const override { return "host"; }
  std::string binary() const override { return {}; }

  std::vector<std::string> build_argv(const std::string&, const std::string&, bool, bool) const override {
    throw Error(Exit::config, "the host engine cannot build images: it runs without a container",
                "set singularity.engine = \"singularity\" or \"apptainer\" (in the config or with --config) "
                "on a machine that has one");
  }
  std::vector<std::string> instance_start_argv(const InstanceSpec&) const override { return {}; }
  std::vector<std::string> instance_stop_argv(const std::string&, bool, int) const override { return {}; }
  std::vector<std::string> instance_list_argv(const std::string&) const override { return {}; }

  std::vector<std::string> exec_argv(const std::string&, const std::vector<std::string>& cmd) const override {
    if (cmd.empty()) {
      throw Error(Exit::failure, "host engine: empty command");
    }
    return cmd;
  }

  std::vector<std::string> run_argv(const std::string&) const override {
    throw Error(Exit::config,
                "runscript mode needs a container image: the host engine has no image whose %runscript it could run",
                "use deploy.mode = \"dispatch\" with the host engine, or set singularity.engine = \"singularity\" "
                "/ \"apptainer\"");
  }

  EngineFeatures features() const override { return {}; }
  void set_version(const std::string&) override {}

  Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const override {
    Env env = base;
    for (const auto& [key, value] : vars) {
      env.set(key, value);
    }
    return env;
  }

  void start_instance(const InstanceSpec& spec) override { m_started.insert(spec.name); }
  bool instance_alive(const std::string& name) override { return m_started.count(name) > 0; }
  void stop_instance(const std::string& name, std::chrono::milliseconds) override { m_started.erase(name); }

private:
  std::set<std::string> m_started;
};

}  // namespace

namespace detail {
std::unique_ptr<Engine> make_host() { return std::make_unique<HostEngine>(); }
}  // namespace detail

}  // namespace lhpc::container
