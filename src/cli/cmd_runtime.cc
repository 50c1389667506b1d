// `lithops-hpc runtime build NAME [-f DEF] [--fakeroot] [--force] [--sif-path DIR]`:
// <sif_path>/NAME.sif from a definition file with the configured engine.
// Everything that can be checked is checked before the engine runs, so a
// refusal never leaves half an image behind.
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <iostream>
#include <regex>

#include "cli/cli.h"
#include "container/engine.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/signals.h"
#include "util/strings.h"

namespace lhpc::cli {

namespace {

namespace fs = std::filesystem;

constexpr const char* k_default_def = "lithops-default.def";

struct BuildOpts {
  std::string name;
  std::string def;
  std::string sif_path;
  bool fakeroot = false;
  bool force = false;
};

// Runtime names are file names (Lithops maps singularity.runtime to
// <sif_path>/<runtime>.sif): no separators, nothing an engine could take for
// a flag, nothing a shell would mangle.
void check_runtime_name(const std::string& name) {
  static const std::regex re("^[A-Za-z0-9][A-Za-z0-9._+-]*$");
  if (name.size() > 200 || !std::regex_match(name, re)) {
    throw Error(Exit::usage, "invalid runtime name '" + name + "'",
                "use letters, digits, '.', '_', '+' and '-', starting with a letter or digit");
  }
  if (name.size() > 4 && name.ends_with(".sif")) {
    throw Error(Exit::usage, "runtime name '" + name + "' ends in .sif",
                "give the name without .sif: the image is <sif_path>/NAME.sif");
  }
}

// Enough of a file's identity to tell whether the engine touched it.
struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  struct timespec mtime {};
  bool operator==(const FileId& o) const {
    return dev == o.dev && ino == o.ino && size == o.size && mtime.tv_sec == o.mtime.tv_sec &&
           mtime.tv_nsec == o.mtime.tv_nsec;
  }
};

std::optional<FileId> file_id(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    return std::nullopt;
  }
  return FileId{st.st_dev, st.st_ino, st.st_size, st.st_mtim};
}

std::string resolve_def(const std::string& given) {
  if (given.empty()) {
    auto def = container::find_runtime_defs_dir() + "/" + k_default_def;
    if (!path_exists(def)) {
      throw Error(Exit::failure, "the bundled definition " + def + " is missing",
                  "reinstall lithops-hpc, or give a definition file with -f DEF");
    }
    return def;
  }
  std::error_code ec;
  auto st = fs::status(given, ec);
  if (ec || !fs::exists(st)) {
    throw Error(Exit::usage, "definition file " + given + " does not exist",
                "give the path of a Singularity/Apptainer definition file with -f DEF");
  }
  if (!fs::is_regular_file(st) || ::access(given.c_str(), R_OK) != 0) {
    throw Error(Exit::usage, "definition file " + given + " is not a readable file",
                "give the path of a Singularity/Apptainer definition file with -f DEF");
  }
  return fs::absolute(given).lexically_normal().string();
}

void check_image_dir(const std::string& dir, const std::string& origin) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw Error(Exit::failure, "image directory " + dir + " (" + origin + ") does not exist or is not a directory",
                "create it (mkdir -p " + shell_quote(dir) + ") or choose another with --sif-path DIR");
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    throw Error(Exit::failure, "cannot write to image directory " + dir + " (" + origin + "): " + errno_text(errno),
                "choose a directory you can write to with --sif-path DIR");
  }
}

// Runs the build in the foreground, streaming its output. SIGINT/SIGTERM/
// SIGHUP are passed on to the engine so it cleans up its temporary files,
// and reported once it ended: returns the wait status and the signal (0: none).
std::pair<int, int> run_build(const std::vector<std::string>& argv, const std::string& cwd) {
  SignalPipe signals({SIGINT, SIGTERM, SIGHUP});
  // A build runs nothing that talks to the broker: no URL in its environment.
  Child child = spawn({.argv = argv, .env = container::engine_command_env(Env::current()), .stdin_fd = STDIN_FILENO,
                       .cwd = cwd});
  int got = 0;
  while (!child.try_wait()) {
    pollfd p{signals.fd(), POLLIN, 0};
    if (::poll(&p, 1, 200) > 0) {
      for (int sig : signals.drain()) {
        got = sig;
        child.signal(sig);
      }
    }
  }
  return {*child.status(), got};
}

int build_runtime(const Globals& g, const BuildOpts& o, bool fakeroot_given) {
  check_runtime_name(o.name);
  auto cfg = load_config(g);
  std::string origin = "--sif-path";
  if (!o.sif_path.empty()) {
    cfg.singularity.sif_path = o.sif_path;
  } else {
    origin = "singularity.sif_path" + (cfg.source.empty() ? std::string(" default") : " in " + cfg.source);
  }
  auto eff = config::expanded(cfg, config::current_placeholders());
  bool fakeroot = fakeroot_given ? o.fakeroot : eff.singularity.fakeroot;

  auto engine = container::make_engine(eff.singularity.engine);
  if (engine->kind() == config::Engine::host) {
    throw Error(Exit::config,
                "cannot build images with the host engine (singularity.engine = \"host\"" +
                    (cfg.source.empty() ? std::string() : " in " + cfg.source) + "): it runs without a container",
                "build on a machine with Singularity or Apptainer, with singularity.engine = \"singularity\" or "
                "\"apptainer\"");
  }
  auto def = resolve_def(o.def);
  auto dir = fs::absolute(eff.singularity.sif_path).lexically_normal().string();
  if (dir.size() > 1 && dir.back() == '/') {
    dir.pop_back();
  }
  check_image_dir(dir, origin);
  auto out = dir + "/" + o.name + ".sif";
  auto before = file_id(out);
  if (before && !o.force) {
    throw Error(Exit::failure, out + " already exists", "add --force to replace it");
  }
  auto argv = engine->build_argv(out, def, fakeroot, o.force);
  argv[0] = engine->binary();  // Exit::engine with what to load when missing

  // %files sources are relative to the build's working directory, and the
  // bundled definitions name theirs relative to their own directory.
  auto cwd = dirname_of(def);
  spdlog::info("building {} from {} with {}", out, def, engine->name());
  spdlog::debug("running {} (in {})", join_argv(argv), cwd);
  auto [status, sig] = run_build(argv, cwd);

  bool ok = sig == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (!ok) {
    auto after = file_id(out);
    std::string removed;
    if (after && (!before || !(*after == *before))) {
      ::unlink(out.c_str());
      removed = "; removed the partial image " + out;
    }
    if (sig != 0) {
      spdlog::error("build interrupted by signal {}{}", sig, removed);
      return exit_code_for_signal(sig);
    }
    throw Error(Exit::engine, engine->name() + " build " + describe_status(status) + removed,
                "the engine's messages above say why; run it by hand from " + cwd + ": " +
                    join_argv(engine->build_argv(out, def, fakeroot, o.force)));
  }
  auto size = file_size(out);
  if (!size) {
    throw Error(Exit::engine, engine->name() + " build reported success but " + out + " does not exist",
                "run the build by hand from " + cwd + ": " + join_argv(engine->build_argv(out, def, fakeroot, o.force)));
  }
  std::cout << "built " << out << " (" << human_bytes(static_cast<double>(*size)) << ")\n"
            << "check it with: lithops-hpc sif inspect " << shell_quote(out) << "\n";
  return 0;
}

}  // namespace

void register_runtime(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* rt = parent.add_subcommand("runtime", "build runtime images");
  rt->require_subcommand(1);
  auto* build = rt->add_subcommand("build", "build <sif_path>/NAME.sif from a definition file");
  auto o = std::make_shared<BuildOpts>();
  build->add_option("NAME", o->name, "runtime name (singularity.runtime): the image is <sif_path>/NAME.sif")
      ->required();
  build->add_option("-f,--file", o->def, "definition file (default: the bundled runtime-defs/lithops-default.def)")
      ->type_name("DEF");
  auto* fakeroot = build->add_flag("--fakeroot,!--no-fakeroot", o->fakeroot,
                                   "build as fake root (default: singularity.fakeroot)");
  build->add_flag("--force", o->force, "replace an existing image");
  build->add_option("--sif-path", o->sif_path, "directory of the image (default: singularity.sif_path)")
      ->type_name("DIR");
  actions.push_back({build, [&g, o, fakeroot] { return build_runtime(g, *o, fakeroot->count() > 0); }});
}

}  // namespace lhpc::cli
