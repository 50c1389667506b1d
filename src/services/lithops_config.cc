#include "services/lithops_config.h"

#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>

#include "config/config.h"
#include "util/error.h"
#include "util/fs.h"

namespace lhpc::services {

std::string lithops_config_target() {
  auto found = config::find_lithops_config();
  if (!found || *found == "/etc/lithops/config") {
    return home_dir() + "/.lithops/config";
  }
  return *found;
}

namespace {

// A symbolic link (dotfiles kept elsewhere) is written through, not replaced.
std::string resolved(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) != nullptr) {
    return buf;
  }
  return path;
}

Error not_writable(const std::string& path, int err) {
  return Error(Exit::config, "cannot write the Lithops config " + path + ": " + errno_text(err),
               "make it (and its directory) writable by you, or point LITHOPS_CONFIG_FILE at a file you own "
               "(Lithops reads that variable too)");
}

}  // namespace

ConfigWrite write_lithops_config(const std::string& path, const std::vector<config::YamlSet>& sets) {
  ConfigWrite w;
  w.path = path;
  std::string old;
  bool existed = path_exists(path);
  if (existed) {
    old = read_file(path);
  }
  auto edit = config::set_lithops_keys(old, sets, path);
  w.comments_lost = edit.comments_lost;
  if (existed && edit.text == old) {
    return w;
  }
  auto real = existed ? resolved(path) : path;
  auto dir = dirname_of(real);
  if (!path_exists(dir)) {
    mkdirs(dir, 0700);
  }
  if (::access(dir.c_str(), W_OK) != 0 || (existed && ::access(real.c_str(), W_OK) != 0)) {
    throw not_writable(path, errno);
  }
  try {
    if (existed) {
      w.backup = real + ".bak";
      write_file_atomic(w.backup, old, 0600);
    }
    // 0600 whatever it was: it holds the broker's and the store's passwords now.
    write_file_atomic(real, edit.text, 0600);
  } catch (const Error& e) {
    throw Error(Exit::config, e.what(), not_writable(path, EACCES).hint());
  }
  w.changed = true;
  return w;
}

}  // namespace lhpc::services
