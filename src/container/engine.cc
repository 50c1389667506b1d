// make_engine() and where the bundled runtime definitions live.
#include "container/engine.h"

#include <filesystem>

#include "lhpc_build_config.h"
#include "util/error.h"
#include "util/strings.h"

namespace lhpc::container {

std::unique_ptr<Engine> make_engine(config::Engine kind) {
  switch (kind) {
    case config::Engine::singularity:
    case config::Engine::apptainer:
      return detail::make_singularity_family(kind);
    case config::Engine::host:
      return detail::make_host();
  }
  throw Error(Exit::config, "unknown container engine");
}

namespace {

namespace fs = std::filesystem;

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

// A binary meson built sits in the build tree, whose root holds meson-private/.
bool inside_meson_build_tree(const fs::path& exe_dir) {
  fs::path d = exe_dir;
  for (int up = 0; up < 6 && !d.empty(); ++up) {
    if (is_dir(d / "meson-private")) {
      return true;
    }
    if (d == d.parent_path()) {
      break;
    }
    d = d.parent_path();
  }
  return false;
}

}  // namespace

std::string find_runtime_defs_dir() {
  std::error_code ec;
  fs::path exe_dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
  const fs::path source = fs::path(LHPC_SOURCE_ROOT) / "runtime-defs";
  std::vector<fs::path> candidates;
  if (!ec) {
    // Installed: <prefix>/bin/lithops-hpc and <prefix>/share/lithops-hpc,
    // found relative to the binary so a moved installation still works.
    candidates.push_back(exe_dir.parent_path() / "share" / "lithops-hpc" / "runtime-defs");
    // A build tree runs the definitions being edited, not an older install.
    if (inside_meson_build_tree(exe_dir)) {
      candidates.push_back(source);
    }
  }
  candidates.push_back(fs::path(LHPC_DATADIR) / "runtime-defs");
  candidates.push_back(source);
  std::vector<std::string> tried;
  for (const auto& c : candidates) {
    if (is_dir(c)) {
      return c.lexically_normal().string();
    }
    tried.push_back(c.lexically_normal().string());
  }
  throw Error(Exit::failure, "the bundled runtime definitions are not installed (looked in " + join(tried, ", ") + ")",
              "reinstall lithops-hpc, or give a definition file with -f DEF");
}

}  // namespace lhpc::container
