#include "services/lithops_config.h"

#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <optional>

#include "config/config.h"
#include "util/error.h"
#include "util/fd.h"
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

// Lithops configs are a few kilobytes; a bigger file is not one.
constexpr std::size_t k_max_config_bytes = 1 << 20;

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

// The file as it is, by the rules for any configuration file (util/fs's
// read_trusted_file): ours, regular, not writable by others, in directories
// only root or we control, through links only root or we made; nullopt when
// missing. What another user could have written or swapped is refused: we
// would copy it to .bak and put our passwords beside it.
std::optional<std::string> read_current(const std::string& path) {
  try {
    return read_trusted_file(path, k_max_config_bytes, FileOwner::me);
  } catch (const Error& e) {
    throw Error(Exit::config, "the Lithops config: " + std::string(e.what()), e.hint());
  }
}

// The directory the file goes in, by the same rules (created 0700 when
// missing), held open: the file and its .bak are written through it.
UniqueFd target_dir(const std::string& dir) {
  try {
    return make_trusted_dir(dir, 0700);
  } catch (const Error& e) {
    throw Error(Exit::config, "the Lithops config's directory: " + std::string(e.what()), e.hint());
  }
}

}  // namespace

ConfigWrite write_lithops_config(const std::string& path, const std::vector<config::YamlSet>& sets) {
  ConfigWrite w;
  w.path = path;
  auto old = read_current(path);
  auto edit = config::set_lithops_keys(old.value_or(""), sets, path);
  w.comments_lost = edit.comments_lost;
  if (old && edit.text == *old) {
    return w;
  }
  auto real = old ? resolved(path) : path;
  auto dir = target_dir(dirname_of(real));
  auto name = basename_of(real);
  try {
    if (old) {
      w.backup = real + ".bak";
      write_file_atomic_at(dir.get(), name + ".bak", *old, 0600, w.backup);
    }
    // 0600 whatever it was: it holds the broker's and the store's passwords now.
    write_file_atomic_at(dir.get(), name, edit.text, 0600, real);
  } catch (const Error& e) {
    throw Error(Exit::config, e.what(), not_writable(path, EACCES).hint());
  }
  w.changed = true;
  return w;
}

}  // namespace lhpc::services
