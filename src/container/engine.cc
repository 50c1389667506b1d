// make_engine(), what each engine release offers, the environment and bind
// rules shared by the singularity family, and where the bundled runtime
// definitions live.
#include "container/engine.h"

#include <array>
#include <cstdio>
#include <filesystem>

#include "lhpc_build_config.h"
#include "lhpc_source_root.h"
#include "util/error.h"
#include "util/strings.h"

namespace lhpc::container {

std::unique_ptr<Engine> make_engine(config::Engine kind) {
  switch (kind) {
    case config::Engine::singularity:
    case config::Engine::apptainer: return detail::make_singularity_family(kind);
    case config::Engine::host: return detail::make_host();
  }
  throw Error(Exit::config, "unknown container engine");
}

namespace {

struct Release {
  int major = -1, minor = 0, patch = 0;
  bool at_least(int ma, int mi, int pa) const { return std::array{major, minor, patch} >= std::array{ma, mi, pa}; }
};

// The leading MAJOR.MINOR.PATCH of a version line; major -1 when there is none.
Release read_release(const std::string& version) {
  Release r;
  auto text = trim(version);
  auto pos = text.find_first_of("0123456789");
  if (pos == std::string::npos || std::sscanf(text.c_str() + pos, "%d.%d.%d", &r.major, &r.minor, &r.patch) < 2) {
    return Release{};
  }
  return r;
}

}  // namespace

EngineFeatures features_for(config::Engine kind, const std::string& version) {
  EngineFeatures f;
  Release r = read_release(version);
  if (r.major < 0 || kind == config::Engine::host) {
    return f;
  }
  // Apptainer's releases are 1.x (also behind its `singularity` link);
  // SingularityCE's are 3.x and later.
  bool apptainer = kind == config::Engine::apptainer || r.major < 3;
  f.no_eval = apptainer ? r.at_least(1, 1, 0) : r.at_least(3, 10, 0);
  return f;
}

std::string escape_for_engine_eval(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\' || c == '$' || c == '`') {
      out += '\\';
    }
    out += c;
  }
  return out;
}

Env engine_command_env(const Env& base) {
  Env env = base;
  for (const char* k : {"AMQP_URL", "SINGULARITYENV_AMQP_URL", "APPTAINERENV_AMQP_URL"}) {
    env.unset(k);
  }
  return env;
}

void check_bind_path(const std::string& path, const std::string& where) {
  auto bad = path.find_first_of(",:");
  if (bad == std::string::npos) {
    return;
  }
  throw Error(
      Exit::config,
      where + ": the path '" + path + "' holds '" + path[bad] +
          "', which singularity and apptainer read as a separator in --bind (',' between binds, ':' "
          "between source, destination and options)",
      "move or link it to a path without ',' or ':' (ln -s '" + path + "' /some/plain/path) and use that path instead");
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
