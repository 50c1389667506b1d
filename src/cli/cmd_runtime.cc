// `lithops-hpc runtime build [NAME] [-f DEF] [--fakeroot] [--force] [--sif-path DIR] [--gpus-per-slot N]
// [--gpu-vendor VENDOR]`:
// <sif_path>/NAME.sif from a definition file with the configured engine
// (NAME defaults to singularity.runtime, as the Lithops client names it; the
// checks and the build itself: container/build.h).
#include <iostream>

#include "cli/cli.h"
#include "config/image_labels.h"
#include "container/build.h"
#include "container/engine.h"
#include "util/error.h"
#include "util/strings.h"

namespace lhpc::cli {

namespace {

struct BuildOpts {
  std::string name;
  std::string def;
  std::string sif_path;
  bool fakeroot = false;
  bool force = false;
  int gpus_per_slot = -1;  // -1: no label
  std::string gpu_vendor;
};

// With a NAME other than the configured runtime: the line that makes the
// Lithops client (and deploy) use the new image.
std::string config_line_for(const config::Config& cfg, const std::string& name) {
  if (name == cfg.singularity.runtime) {
    return {};
  }
  std::string file = cfg.lithops.source.empty() ? "~/.lithops/config" : cfg.lithops.source;
  return "to use it, put `runtime: " + name + "` under `singularity:` in " + file +
         (cfg.origin("singularity.runtime").from == config::From::toml
              ? " and remove singularity.runtime from " + cfg.source
              : std::string());
}

Exit build_runtime(const Globals& g, BuildOpts o, bool fakeroot_given) {
  if (!o.name.empty()) {
    container::check_runtime_name(o.name);  // before the configuration: a typo is the likelier mistake
  }
  auto cfg = load_config(g);
  if (o.name.empty()) {
    o.name = cfg.singularity.runtime;
    if (o.name.empty()) {
      throw Error(Exit::usage, "runtime build needs a NAME: singularity.runtime is not set",
                  "give a NAME, or set `runtime: NAME` under `singularity:` in ~/.lithops/config");
    }
  }
  container::BuildRequest req{.name = o.name, .def = o.def, .config_source = cfg.source, .force = o.force};
  req.dir_origin = "--sif-path";
  if (!o.sif_path.empty()) {
    cfg.singularity.sif_path = o.sif_path;
  } else {
    req.dir_origin = "singularity.sif_path (" + config::to_string(cfg.origin("singularity.sif_path")) + ")";
  }
  auto eff = config::expanded(cfg, config::current_placeholders());
  req.dir = eff.singularity.sif_path;
  req.fakeroot = fakeroot_given ? o.fakeroot : eff.singularity.fakeroot;
  if (o.gpus_per_slot >= 0) {
    req.labels.emplace_back(config::k_gpus_per_slot_label, std::to_string(o.gpus_per_slot));
  }
  if (!o.gpu_vendor.empty()) {
    req.labels.emplace_back(config::k_gpu_vendor_label, o.gpu_vendor);
  }
  auto engine = container::make_engine(eff.singularity.engine);
  auto built = container::build_image(*engine, req);
  std::cout << "built " << built.path << " (" << human_bytes(static_cast<double>(built.bytes)) << ")\n"
            << "check it with: lithops-hpc sif inspect " << shell_quote(built.path) << "\n";
  if (auto line = config_line_for(cfg, o.name); !line.empty()) {
    std::cout << line << "\n";
  }
  return Exit::ok;
}

}  // namespace

void register_runtime(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* rt = parent.add_subcommand("runtime", "build runtime images");
  rt->require_subcommand(1);
  auto* build =
      rt->add_subcommand("build", "build <sif_path>/NAME.sif (NAME: singularity.runtime) from a definition file");
  auto o = std::make_shared<BuildOpts>();
  build->add_option("NAME", o->name, "runtime name (default: singularity.runtime): the image is <sif_path>/NAME.sif");
  build->add_option("-f,--file", o->def, "definition file (default: the bundled runtime-defs/lithops-default.def)")
      ->type_name("DEF");
  auto* fakeroot =
      build->add_flag("--fakeroot,!--no-fakeroot", o->fakeroot, "build as fake root (default: singularity.fakeroot)");
  build->add_flag("--force", o->force, "replace an existing image");
  build->add_option("--sif-path", o->sif_path, "directory of the image (default: singularity.sif_path)")
      ->type_name("DIR");
  build
      ->add_option("--gpus-per-slot", o->gpus_per_slot,
                   "make it a GPU runtime: label org.lithops-hpc.gpus-per-slot N, which worker, deploy and "
                   "autoalloc take when no flag or singularity.gpus_per_slot sets it")
      ->type_name("N")
      ->check(CLI::Range(0, 64));
  build
      ->add_option("--gpu-vendor", o->gpu_vendor,
                   "label org.lithops-hpc.gpu-vendor: nvidia or amd (taken like --gpus-per-slot's label)")
      ->type_name("VENDOR")
      ->check(choice(config::k_gpu_vendor_names));
  actions.push_back({build, [&g, o, fakeroot] { return build_runtime(g, *o, fakeroot->count() > 0); }});
}

}  // namespace lhpc::cli
