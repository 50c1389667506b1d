// The command line: CLI11 parsing and dispatch to the library. No logic here
// beyond turning options into calls; each subcommand lives in cmd_<name>.cc.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"

namespace lhpc::cli {

struct Globals {
  std::string config_path;
  std::string log_level = "info";
  bool verbose = false;
};

// A leaf subcommand and what runs when it was given; returns the exit code.
struct Action {
  CLI::App* app;
  std::function<int()> run;
};

// Each registers its subcommands under `parent` and appends its actions.
using Register = void (*)(CLI::App& parent, Globals& g, std::vector<Action>& actions);

// Loads the configuration the globals point at and logs its warnings.
config::Config load_config(const Globals& g);

int run(int argc, char** argv);

}  // namespace lhpc::cli
