// `lithops-hpc sif inspect PATH [--json]`
#include <iostream>

#include "cli/cli.h"
#include "sif/sif.h"
#include "util/error.h"

namespace lhpc::cli {

void register_sif(CLI::App& parent, Globals&, std::vector<Action>& actions) {
  auto* sif = parent.add_subcommand("sif", "inspect SIF images");
  sif->require_subcommand(1);
  auto* inspect = sif->add_subcommand("inspect", "print a SIF image's header, objects and partitions");
  struct Opts {
    std::string path;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  inspect->add_option("PATH", o->path, "the .sif file")->required();
  inspect->add_flag("--json", o->json, "machine-readable output");
  actions.push_back({inspect, [o] {
                       auto img = sif::read_image(o->path);
                       if (o->json) {
                         std::cout << sif::to_json(img).dump(2) << "\n";
                       } else {
                         std::cout << sif::format_text(img);
                       }
                       return Exit::ok;
                     }});
}

}  // namespace lhpc::cli
