// `lithops-hpc config check`: validate, print the effective config (redacted)
// with where each value came from, check the Lithops client's settings, find
// the engine, reach the broker. Exit 0, or the code of the first problem
// (3 config, 6 engine, 5 broker), after reporting every check.
#include <iostream>
#include <memory>
#include <optional>

#include "amqp/connection.h"
#include "cli/cli.h"
#include "config/client_lint.h"
#include "config/image_labels.h"
#include "container/engine.h"
#include "util/error.h"
#include "util/fs.h"

namespace lhpc::cli {

namespace {

// The Lithops client's side: each finding says the fix.
void check_client(const config::Config& c, const config::Config& loaded) {
  config::ClientFacts facts;
  facts.client_python = config::client_python_version();
  if (c.singularity.runtime.empty()) {
    facts.image_python_why = "no image (singularity.runtime is not set)";
  } else if (facts.image = config::image_path(loaded); path_exists(facts.image)) {
    facts.image_python = config::image_python_version(facts.image, &facts.image_python_why);
  } else {
    facts.image_python_why = facts.image + " does not exist here";
  }
  std::cout << "lithops client: " << (c.lithops.source.empty() ? "(no Lithops config found)" : c.lithops.source)
            << "\n";
  auto findings = config::lint_client(c, facts);
  for (const auto& f : findings) {
    std::cout << (f.level == config::Finding::Level::warning ? "  warning: " : "  note: ") << f.text << "\n";
  }
  if (findings.empty()) {
    std::cout << "  ok\n";
  }
}

// Each problem printed where it is found; the exit code is the first one's.
class Problems {
public:
  void add(const Error& e) {
    std::cout << "  " << e.what() << (e.hint().empty() ? "" : "\n  hint: " + e.hint()) << "\n";
    if (m_rc == Exit::ok) {
      m_rc = e.code();
    }
  }
  Exit rc() const { return m_rc; }

private:
  Exit m_rc = Exit::ok;
};

void print_listing(const config::Config& c, bool all) {
  int at_default = 0;
  auto listing = config::to_toml(c, true, !all, &at_default);
  std::cout << "# config: " << (c.source.empty() ? "(no lithops-hpc TOML found)" : c.source) << "\n"
            << "# Lithops config: " << (c.lithops.source.empty() ? "(none found)" : c.lithops.source) << "\n"
            << "# precedence: flag > environment (AMQP_URL) > lithops-hpc TOML > Lithops config > image label "
               "(gpus_per_slot, gpu_vendor) > default\n"
            << listing;
  if (at_default > 0) {
    std::cout << "# " << at_default << " more key" << (at_default == 1 ? "" : "s")
              << " at the default (config check --all lists every key)\n";
  }
  std::cout << "\n";
  for (const auto& w : c.warnings) {
    std::cout << "warning: " << w << "\n";
  }
}

// The runtime a deployment with this configuration serves (RUNTIMES in lithops-hpc(1)).
void print_runtime(const config::Config& c, const config::Config& loaded) {
  if (c.singularity.runtime.empty()) {
    std::cout << "runtime: not set: a deployment serves the runtime its --sif image is named after "
                 "(the host engine without an image: every runtime)\n";
  } else if (c.singularity.engine == config::Engine::host) {
    std::cout << "runtime: " << c.singularity.runtime << " (host engine: no image)\n";
  } else {
    auto image = config::image_path(loaded);
    std::cout << "runtime: " << c.singularity.runtime << ", image " << image << "\n";
    std::cout << "image: " << image << (path_exists(image) ? "" : " (not found on this machine)") << "\n";
  }
}

void check_engine(const config::Config& c, Problems& problems) {
  std::cout << "engine: " << config::k_engine_names.text(c.singularity.engine) << ": ";
  try {
    auto engine = container::make_engine(c.singularity.engine);
    auto path = engine->binary();
    std::cout << (path.empty() ? "no container (host engine)" : path) << "\n";
  } catch (const Error& e) {
    std::cout << "NOT FOUND\n";
    problems.add(e);
  }
}

void check_broker(const config::Config& c, Problems& problems) {
  std::cout << "broker: ";
  try {
    config::require_amqp_url(c);
    std::cout << config::redact_url(c.rabbitmq.amqp_url) << ": " << std::flush;
    amqp::Connection conn(amqp::options_from(c.rabbitmq));
    std::cout << "connected; ";
    try {
      auto depth = conn.queue_depth(c.rabbitmq.queue);
      std::cout << "queue " << c.rabbitmq.queue << " holds " << depth << " message(s)\n";
    } catch (const Error&) {
      // A passive declare of a queue nobody declared yet: the client will.
      std::cout << "queue " << c.rabbitmq.queue << " not declared yet (the Lithops client or a worker declares it)\n";
    }
  } catch (const Error& e) {
    std::cout << "FAILED\n";
    problems.add(e);
  }
}

Exit check(const Globals& g, bool all) {
  // config::load, not load_config: the warnings are printed below, not logged twice.
  auto loaded = config::load(g.config_path);
  auto c = config::expanded(loaded, config::current_placeholders());
  // The image's GPU labels where no key set them, shown with that origin.
  std::optional<Error> label_error;
  if (c.singularity.engine != config::Engine::host && !c.singularity.runtime.empty()) {
    try {
      config::apply_image_labels(c, config::image_path(loaded));
    } catch (const Error& e) {
      label_error = e;
    }
  }
  print_listing(c, all);
  check_client(c, loaded);
  Problems problems;
  if (label_error) {
    std::cout << "image labels: ";
    problems.add(*label_error);
  }
  print_runtime(c, loaded);
  check_engine(c, problems);
  check_broker(c, problems);
  return problems.rc();
}

}  // namespace

void register_config(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* cfg = parent.add_subcommand("config", "configuration");
  cfg->require_subcommand(1);
  auto* chk = cfg->add_subcommand("check", "validate the config, find the engine, reach the broker");
  auto all = std::make_shared<bool>(false);
  chk->add_flag("--all", *all, "list every key with its value and origin, the defaults too");
  actions.push_back({chk, [&g, all] { return check(g, *all); }});
}

}  // namespace lhpc::cli
