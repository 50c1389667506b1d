#include "container/build.h"

#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <optional>
#include <regex>

#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/signals.h"
#include "util/strings.h"

namespace lhpc::container {

namespace {

namespace fs = std::filesystem;

// A file of ours that goes when the scope does (the labelled copy of a definition).
struct RemovedAtEnd {
  std::string path;
  RemovedAtEnd() = default;
  RemovedAtEnd(const RemovedAtEnd&) = delete;
  RemovedAtEnd& operator=(const RemovedAtEnd&) = delete;
  ~RemovedAtEnd() {
    if (!path.empty()) {
      ::unlink(path.c_str());
    }
  }
};

constexpr const char* k_default_def = "lithops-default.def";
constexpr std::size_t k_max_name = 200;

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

// Runs the build in the foreground. SIGINT/SIGTERM/SIGHUP are passed on to
// the engine so it cleans up its temporary files, and reported once it
// ended: returns the wait status and the signal (0: none).
std::pair<int, int> supervise(const std::vector<std::string>& argv, const std::string& cwd) {
  SignalPipe signals({SIGINT, SIGTERM, SIGHUP});
  // A build runs nothing that talks to the broker: no URL in its environment.
  Child child = spawn({.argv = argv, .env = engine_command_env(Env::current()), .stdin_fd = STDIN_FILENO, .cwd = cwd});
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

std::string trimmed_dir(const std::string& dir) {
  auto abs = fs::absolute(dir).lexically_normal().string();
  if (abs.size() > 1 && abs.back() == '/') {
    abs.pop_back();
  }
  return abs;
}

void refuse_host(const Engine& engine, const std::string& config_source) {
  if (engine.kind() != config::Engine::host) {
    return;
  }
  throw Error(Exit::config,
              "cannot build images with the host engine (singularity.engine = \"host\"" +
                  (config_source.empty() ? std::string() : " in " + config_source) + "): it runs without a container",
              "build on a machine with Singularity or Apptainer, with singularity.engine = \"singularity\" or "
              "\"apptainer\"");
}

}  // namespace

void check_runtime_name(const std::string& name) {
  // The cap comes first: std::regex_match recurses per character.
  static const std::regex re("^[A-Za-z0-9][A-Za-z0-9._+-]*$");
  if (name.size() > k_max_name || !std::regex_match(name, re)) {
    throw Error(Exit::usage,
                "invalid runtime name '" + (name.size() > k_max_name ? name.substr(0, 40) + "...'" : name + "'") +
                    (name.size() > k_max_name ? " (" + std::to_string(name.size()) + " characters)" : ""),
                "use at most 200 letters, digits, '.', '_', '+' and '-', starting with a letter or digit");
  }
  if (name.size() > 4 && name.ends_with(".sif")) {
    throw Error(Exit::usage, "runtime name '" + name + "' ends in .sif",
                "give the name without .sif: the image is <sif_path>/NAME.sif");
  }
}

std::string resolve_definition(const std::string& given) {
  if (given.empty()) {
    auto def = find_runtime_defs_dir() + "/" + k_default_def;
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

std::string with_labels(const std::string& def, const std::vector<std::pair<std::string, std::string>>& labels) {
  std::string lines;
  for (const auto& [k, v] : labels) {
    if (k.empty() || v.empty() || k.find_first_of(" \t\r\n") != std::string::npos ||
        v.find_first_of("\r\n") != std::string::npos) {
      throw Error(Exit::usage, "label '" + k + "' = '" + v + "' cannot be written into a definition file",
                  "a label is one word and a value on one line");
    }
    lines += "    " + k + " " + v + "\n";
  }
  // The end of the first %labels section: the next line starting a section.
  std::size_t at = std::string::npos;
  std::size_t pos = 0;
  bool in_labels = false;
  while (pos < def.size()) {
    auto end = def.find('\n', pos);
    auto next = end == std::string::npos ? def.size() : end + 1;
    auto t = trim(def.substr(pos, next - pos));
    if (starts_with(t, "%")) {
      if (in_labels) {
        at = pos;
        break;
      }
      in_labels = t == "%labels" || starts_with(t, "%labels ") || starts_with(t, "%labels\t");
    }
    pos = next;
  }
  std::string body = def;
  if (!body.empty() && body.back() != '\n') {
    body += '\n';
  }
  if (at == std::string::npos) {
    return in_labels ? body + lines : body + "\n%labels\n" + lines;
  }
  return body.substr(0, at) + lines + body.substr(at);
}

BuiltImage build_image(Engine& engine, const BuildRequest& req) {
  check_runtime_name(req.name);
  refuse_host(engine, req.config_source);
  auto def = resolve_definition(req.def);
  auto dir = trimmed_dir(req.dir);
  check_image_dir(dir, req.dir_origin);
  auto out = dir + "/" + req.name + ".sif";
  auto before = file_id(out);
  if (before && !req.force) {
    throw Error(Exit::failure, out + " already exists", "add --force to replace it");
  }
  // Labels to add: a copy of the definition beside the image, gone after the build.
  std::string built_from = def;
  RemovedAtEnd copy;
  if (!req.labels.empty()) {
    auto path = dir + "/." + req.name + ".def." + std::to_string(::getpid());
    write_file_atomic(path, with_labels(read_file(def), req.labels), 0600);
    copy.path = built_from = path;
  }
  auto argv = engine.build_argv(out, built_from, req.fakeroot, req.force);
  auto by_hand = join_argv(argv);
  argv[0] = engine.binary();  // Exit::engine with what to load when missing

  // %files sources are relative to the build's working directory, and the
  // bundled definitions name theirs relative to their own directory.
  auto cwd = dirname_of(def);
  spdlog::info("building {} from {} with {}", out, def, engine.name());
  spdlog::debug("running {} (in {})", join_argv(argv), cwd);
  auto [status, sig] = supervise(argv, cwd);

  if (sig != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    auto after = file_id(out);
    std::string removed;
    if (after && (!before || !(*after == *before))) {
      ::unlink(out.c_str());
      removed = "; removed the partial image " + out;
    }
    if (sig != 0) {
      throw Error(exit_for_signal(sig), "build interrupted by signal " + std::to_string(sig) + removed);
    }
    throw Error(Exit::engine, engine.name() + " build " + describe_status(status) + removed,
                "the engine's messages above say why; run it by hand from " + cwd + ": " + by_hand);
  }
  auto size = file_size(out);
  if (!size) {
    throw Error(Exit::engine, engine.name() + " build reported success but " + out + " does not exist",
                "run the build by hand from " + cwd + ": " + by_hand);
  }
  return {out, static_cast<std::uint64_t>(*size)};
}

}  // namespace lhpc::container
