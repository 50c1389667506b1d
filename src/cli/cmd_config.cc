// `lithops-hpc config check`: validate, print the effective config (redacted),
// find the engine, reach the broker. Exit 0, or the code of the first problem
// (3 config, 6 engine, 5 broker), after reporting every check.
#include <iostream>

#include "amqp/connection.h"
#include "cli/cli.h"
#include "container/engine.h"
#include "util/error.h"

namespace lhpc::cli {

namespace {

int check(const Globals& g) {
  auto c = config::expanded(load_config(g), config::current_placeholders());
  std::cout << "# config: " << (c.source.empty() ? "(none found: defaults)" : c.source) << "\n"
            << config::to_toml(c) << "\n";
  int rc = 0;
  auto fail = [&rc](const Error& e) {
    std::cout << "  " << e.what() << (e.hint().empty() ? "" : "\n  hint: " + e.hint()) << "\n";
    if (rc == 0) {
      rc = static_cast<int>(e.code());
    }
  };

  std::cout << "engine: " << config::to_string(c.singularity.engine) << ": ";
  try {
    auto engine = container::make_engine(c.singularity.engine);
    auto path = engine->binary();
    std::cout << (path.empty() ? "no container (host engine)" : path) << "\n";
  } catch (const Error& e) {
    std::cout << "NOT FOUND\n";
    fail(e);
  }

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
    fail(e);
  }
  return rc;
}

}  // namespace

void register_config(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* cfg = parent.add_subcommand("config", "configuration");
  cfg->require_subcommand(1);
  auto* chk = cfg->add_subcommand("check", "validate the config, find the engine, reach the broker");
  actions.push_back({chk, [&g] { return check(g); }});
}

}  // namespace lhpc::cli
