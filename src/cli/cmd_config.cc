// `lithops-hpc config check`: validate, print the effective config (redacted),
// find the engine, reach the broker.
#include <iostream>

#include "cli/cli.h"

namespace lhpc::cli {

void register_config(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* cfg = parent.add_subcommand("config", "configuration");
  cfg->require_subcommand(1);
  auto* check = cfg->add_subcommand("check", "validate the config, find the engine, reach the broker");
  actions.push_back({check, [&g] {
                       auto c = load_config(g);
                       auto ph = config::current_placeholders();
                       auto e = config::expanded(c, ph);
                       std::cout << "# config: " << (c.source.empty() ? "(none found: defaults)" : c.source) << "\n"
                                 << config::to_toml(e);
                       return 0;
                     }});
}

}  // namespace lhpc::cli
