#include "util/fs.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <vector>

#include "util/error.h"
#include "util/fd.h"

namespace lhpc {

namespace {
std::string fmt_mode(mode_t m) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(m & 07777));
  return buf;
}
}  // namespace

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(Exit::failure, "cannot read " + path + ": " + errno_text(errno));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {

std::string random_suffix() {
  static const char k_chars[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  std::random_device rd;
  std::string out;
  for (int i = 0; i < 12; ++i) {
    out += k_chars[rd() % (sizeof k_chars - 1)];
  }
  return out;
}

void write_all_or_throw(int fd, const std::string& data, const std::string& shown) {
  std::size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error(Exit::failure, "cannot write " + shown + ": " + errno_text(errno));
    }
    off += static_cast<std::size_t>(n);
  }
}

// Parents may be root's (/, /tmp) or ours; others may write only where the
// sticky bit stops them from renaming or removing what is ours.
void check_parent(const struct stat& st, const std::string& shown) {
  if (st.st_uid != 0 && st.st_uid != ::geteuid()) {
    throw Error(
        Exit::failure,
        shown + " belongs to " + owner_name(st.st_uid) + ", neither to you nor to root: they could swap what is inside",
        "use a directory whose parents are yours or root's (e.g. under /tmp or your home)");
  }
  if ((st.st_mode & 0022) != 0 && (st.st_mode & S_ISVTX) == 0) {
    throw Error(Exit::failure, shown + " is writable by other users and not sticky: they could swap what is inside",
                "chmod go-w " + shown + " (or +t, like /tmp), or use another directory");
  }
}

std::vector<std::string> components(const std::string& path) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < path.size()) {
    auto j = path.find('/', i);
    if (j == std::string::npos) {
      j = path.size();
    }
    if (j > i) {
      out.push_back(path.substr(i, j - i));
    }
    i = j + 1;
  }
  return out;
}

// One step down from a checked directory, never through a symlink.
UniqueFd open_below(int parent_fd, const std::string& name, const std::string& shown) {
  UniqueFd fd(::openat(parent_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) {
    int err = errno;
    struct stat st {};
    if ((err == ELOOP || err == ENOTDIR) && ::fstatat(parent_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISLNK(st.st_mode)) {
      throw Error(Exit::failure,
                  shown + " is a symbolic link, not a directory: lithops-hpc keeps its files only in a real one",
                  "give the real path (realpath " + shown + ")");
    }
    throw Error(Exit::failure, "cannot open directory " + shown + ": " + errno_text(err));
  }
  return fd;
}

// The parent rules applied to an open directory.
void check_dir_fd(int fd, const std::string& shown) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    throw Error(Exit::failure, "cannot stat " + shown + ": " + errno_text(errno));
  }
  check_parent(st, shown);
}

// A symbolic link on the way to a directory is followed only when root or we
// own it: its directory passed check_parent, so nobody else could have put it
// there or swapped it (in a sticky /tmp others can add links, but theirs).
// So /home -> /gpfs/home works, and each part of the target is checked in
// turn. The link's target, or nullopt when `name` is not a link.
std::optional<std::string> trusted_link_target(int parent_fd, const std::string& name, const std::string& shown) {
  struct stat st {};
  if (::fstatat(parent_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISLNK(st.st_mode)) {
    return std::nullopt;
  }
  if (st.st_uid != 0 && st.st_uid != ::geteuid()) {
    throw Error(Exit::failure,
                shown + " is a symbolic link of " + owner_name(st.st_uid) +
                    ", neither yours nor root's: they chose where it leads",
                "give the real path (realpath " + shown + ") if you trust it, or another directory");
  }
  std::string target(PATH_MAX, '\0');
  ssize_t n = ::readlinkat(parent_fd, name.c_str(), target.data(), target.size());
  if (n <= 0 || static_cast<std::size_t>(n) >= target.size()) {
    throw Error(Exit::failure,
                "cannot read the symbolic link " + shown + ": " + errno_text(n < 0 ? errno : ENAMETOOLONG));
  }
  target.resize(static_cast<std::size_t>(n));
  return target;
}

}  // namespace

void write_file_atomic_at(int dir_fd, const std::string& name, const std::string& data, mode_t mode,
                          const std::string& shown_as) {
  std::string tmp;
  UniqueFd fd;
  for (int tries = 0; !fd && tries < 16; ++tries) {
    tmp = "." + name + ".tmp-" + random_suffix();
    fd.reset(::openat(dir_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
    if (!fd && errno != EEXIST) {
      throw Error(Exit::failure, "cannot write " + shown_as + ": " + errno_text(errno));
    }
  }
  if (!fd) {
    throw Error(Exit::failure, "cannot write " + shown_as + ": no free temporary name beside it");
  }
  try {
    // umask must not widen or narrow what we promise.
    if (::fchmod(fd.get(), mode) != 0) {
      throw Error(Exit::failure, "cannot set the mode of " + shown_as + ": " + errno_text(errno));
    }
    write_all_or_throw(fd.get(), data, shown_as);
    if (::fsync(fd.get()) != 0) {
      throw Error(Exit::failure, "cannot write " + shown_as + ": " + errno_text(errno));
    }
    fd.reset();
    if (::renameat(dir_fd, tmp.c_str(), dir_fd, name.c_str()) != 0) {
      throw Error(Exit::failure, "cannot rename a temporary file over " + shown_as + ": " + errno_text(errno));
    }
  } catch (const Error&) {
    ::unlinkat(dir_fd, tmp.c_str(), 0);
    throw;
  }
}

void write_file_atomic(const std::string& path, const std::string& data, mode_t mode) {
  auto dir = dirname_of(path);
  UniqueFd d(::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!d) {
    throw Error(Exit::failure, "cannot write " + path + ": " + errno_text(errno));
  }
  write_file_atomic_at(d.get(), basename_of(path), data, mode, path);
}

namespace {

std::string absolute(const std::string& path) {
  if (!path.empty() && path.front() == '/') {
    return path;
  }
  std::string cwd(PATH_MAX, '\0');
  if (::getcwd(cwd.data(), cwd.size()) == nullptr) {
    throw Error(Exit::failure, "cannot resolve " + path + ": the current directory: " + errno_text(errno));
  }
  cwd.resize(std::strlen(cwd.c_str()));
  return cwd == "/" ? "/" + path : cwd + "/" + path;
}

// Only a missing name is created: mkdirat on one that exists could answer
// EROFS or EACCES rather than EEXIST on some file systems.
void make_missing(int parent_fd, const std::string& name, const std::string& shown, mode_t mode) {
  struct stat st {};
  if (::fstatat(parent_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT) {
    return;
  }
  if (::mkdirat(parent_fd, name.c_str(), mode) != 0 && errno != EEXIST) {
    throw Error(Exit::failure, "cannot create directory " + shown + ": " + errno_text(errno),
                "check that its parent is writable by you");
  }
}

// The walk behind open_trusted_dir: `todo` from /, each directory checked
// before going below it; a link's target (whose "..", unlike the given
// path's, climbs back the directories walked). With `create`, a missing
// directory is made by mkdirat under the one just checked, never by a path
// that a link someone else owns could redirect.
// With `missing`, a directory that does not exist ends the walk with no fd
// and *missing set, instead of an error.
UniqueFd walk_trusted(std::deque<std::string> todo, const std::string& path, const mode_t* create,
                      bool* missing = nullptr) {
  std::vector<std::pair<UniqueFd, std::string>> walked;
  walked.emplace_back(UniqueFd(::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC)), "");
  int links = 0;
  for (;;) {
    const auto& [fd, shown] = walked.back();
    check_dir_fd(fd.get(), shown.empty() ? "/" : shown);
    if (todo.empty()) {
      break;
    }
    auto c = std::move(todo.front());
    todo.pop_front();
    if (c == "." || c == "..") {
      if (c == ".." && walked.size() > 1) {
        walked.pop_back();
      }
      continue;
    }
    auto here = shown + "/" + c;
    if (auto target = trusted_link_target(fd.get(), c, here)) {
      if (++links > 40) {
        throw Error(Exit::failure, path + " goes through more than 40 symbolic links",
                    "give the real path (realpath " + path + ")");
      }
      auto parts = components(*target);
      todo.insert(todo.begin(), parts.begin(), parts.end());
      if (target->front() == '/') {
        walked.resize(1);
      }
      continue;
    }
    if (create != nullptr) {
      make_missing(fd.get(), c, here, *create);
    }
    struct stat st {};
    if (missing != nullptr && ::fstatat(fd.get(), c.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
      *missing = true;
      return {};
    }
    auto next = open_below(fd.get(), c, here);
    walked.emplace_back(std::move(next), here);
  }
  return std::move(walked.back().first);
}

std::deque<std::string> given_components(const std::string& path) {
  auto given = components(path);
  if (std::find(given.begin(), given.end(), "..") != given.end()) {
    throw Error(Exit::failure, path + " has a '..' component", "give the path without '..'");
  }
  return {given.begin(), given.end()};
}

}  // namespace

UniqueFd open_trusted_dir(const std::string& path) {
  if (path.empty() || path.front() != '/') {
    throw Error(Exit::failure, "'" + path + "' is not an absolute path", "give a path starting with /");
  }
  return walk_trusted(given_components(path), path, nullptr);
}

UniqueFd make_trusted_dir(const std::string& path, mode_t mode) {
  auto abs = absolute(path);
  return walk_trusted(given_components(abs), abs, &mode);
}

void mkdirs(const std::string& path, mode_t mode) {
  if (!path.empty()) {
    make_trusted_dir(path, mode);
  }
}

namespace {

// Why a file may not steer lithops-hpc, as an Error; none when it may.
std::optional<Error> untrusted_file(const struct stat& st, const std::string& shown, FileOwner who, std::size_t max) {
  if (S_ISDIR(st.st_mode)) {
    return Error(Exit::failure, shown + " is a directory", "give the path of the file itself");
  }
  if (S_ISLNK(st.st_mode)) {
    return Error(Exit::failure, shown + " is a symbolic link where lithops-hpc keeps a regular file",
                 "check where it leads, then remove it");
  }
  if (!S_ISREG(st.st_mode)) {
    return Error(Exit::failure, shown + " is not a regular file (a FIFO, socket or device)",
                 "give the path of a regular file, or remove what is there");
  }
  bool root_ok = who == FileOwner::me_or_root && st.st_uid == 0;
  if (st.st_uid != ::geteuid() && !root_ok) {
    return Error(Exit::failure,
                 shown + " belongs to " + owner_name(st.st_uid) +
                     (who == FileOwner::me ? ", not to you" : ", neither to you nor to root") +
                     ": they choose what it says, so lithops-hpc does not read it",
                 "have its owner (or root) remove it, or use a file of your own");
  }
  if ((st.st_mode & 0022) != 0) {
    return Error(Exit::failure,
                 shown + " is writable by other users (mode " + fmt_mode(st.st_mode) +
                     "): they could change what it says, so lithops-hpc does not read it",
                 "check what is in it, then chmod go-w " + shown);
  }
  if (static_cast<std::uint64_t>(st.st_size) > max) {
    return Error(Exit::failure,
                 shown + " holds " + std::to_string(st.st_size) + " bytes, more than " + std::to_string(max),
                 "check that it is the right file");
  }
  return std::nullopt;
}

std::string read_checked(int fd, const std::string& shown, std::size_t max) {
  std::string text;
  char buf[65536];
  for (;;) {
    auto n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      throw Error(Exit::failure, "cannot read " + shown + ": " + errno_text(errno));
    }
    if (n == 0) {
      return text;
    }
    if (text.size() + static_cast<std::size_t>(n) > max) {
      throw Error(Exit::failure, shown + " grew past " + std::to_string(max) + " bytes while it was read",
                  "check that it is the right file");
    }
    text.append(buf, static_cast<std::size_t>(n));
  }
}

// `name` in the trusted directory `dir_fd`: checked before it is opened (so
// neither a FIFO nor a device is ever opened) and again once open.
std::string read_file_at(int dir_fd, const std::string& name, const std::string& shown, FileOwner who,
                         std::size_t max) {
  struct stat st {};
  if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    if (auto e = untrusted_file(st, shown, who, max)) {
      throw *e;
    }
  }
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd || ::fstat(fd.get(), &st) != 0) {
    throw Error(Exit::failure, "cannot open " + shown + ": " + errno_text(errno), "check the file's permissions");
  }
  if (auto e = untrusted_file(st, shown, who, max)) {
    throw *e;
  }
  return read_checked(fd.get(), shown, max);
}

}  // namespace

std::optional<std::string> read_trusted_file(const std::string& path, std::size_t max, FileOwner who) {
  auto abs = absolute(path);
  auto shown = abs;
  std::deque<std::string> parts;
  for (auto& c : components(abs)) {
    parts.push_back(std::move(c));
  }
  for (int links = 0;;) {
    if (parts.empty() || parts.back() == "." || parts.back() == "..") {
      throw Error(Exit::failure, shown + " is a directory", "give the path of the file itself");
    }
    auto name = parts.back();
    parts.pop_back();
    bool missing = false;
    auto dir = walk_trusted(parts, shown, nullptr, &missing);
    if (missing) {
      return std::nullopt;
    }
    if (auto target = trusted_link_target(dir.get(), name, shown)) {
      if (++links > 40) {
        throw Error(Exit::failure, path + " goes through more than 40 symbolic links",
                    "give the real path (realpath " + path + ")");
      }
      if (target->front() == '/') {
        parts.clear();
      }
      for (auto& c : components(*target)) {
        parts.push_back(std::move(c));
      }
      shown = abs + " (a link to " + *target + ")";
      continue;
    }
    struct stat st {};
    if (::fstatat(dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
      return std::nullopt;
    }
    return read_file_at(dir.get(), name, shown, who, max);
  }
}

UniqueFd open_private_dir_at(int parent_fd, const std::string& name, const std::string& shown, bool create,
                             bool* created) {
  bool made = create && ::mkdirat(parent_fd, name.c_str(), 0700) == 0;
  if (create && !made && errno != EEXIST) {
    throw Error(Exit::failure, "cannot create directory " + shown + ": " + errno_text(errno),
                "check that its parent exists and is writable by you");
  }
  if (created != nullptr) {
    *created = made;
  }
  auto fd = open_below(parent_fd, name, shown);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    throw Error(Exit::failure, "cannot stat " + shown + ": " + errno_text(errno));
  }
  if (st.st_uid != ::geteuid()) {
    throw Error(Exit::failure,
                shown + " belongs to " + owner_name(st.st_uid) +
                    ", not to you: someone else made it, so nothing in it is trusted",
                "have its owner (or root) remove it, or use another directory");
  }
  if ((st.st_mode & 0022) != 0) {
    throw Error(Exit::failure,
                shown + " is writable by other users (mode " + fmt_mode(st.st_mode) + "), so nothing in it is trusted",
                "check what is in it, then remove it or chmod 700 " + shown);
  }
  if ((st.st_mode & 0077) != 0 && ::fchmod(fd.get(), 0700) != 0) {
    throw Error(Exit::failure, "cannot make " + shown + " private: " + errno_text(errno));
  }
  return fd;
}

UniqueFd open_private_dir(const std::string& path, bool create, bool* created) {
  auto parent = dirname_of(path);
  auto pfd =
      create ? make_trusted_dir(parent.empty() ? "/" : parent, 0755) : open_trusted_dir(parent.empty() ? "/" : parent);
  return open_private_dir_at(pfd.get(), basename_of(path), path, create, created);
}

void make_private_dir(const std::string& path) { open_private_dir(path, true); }

std::optional<std::string> read_private_file(const std::string& path, std::size_t max) {
  if (!path_exists(dirname_of(path))) {
    return std::nullopt;
  }
  auto dir = open_private_dir(dirname_of(path), false);
  struct stat st {};
  if (::fstatat(dir.get(), basename_of(path).c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
    return std::nullopt;
  }
  return read_file_at(dir.get(), basename_of(path), path, FileOwner::me, max);
}

void check_path_component(const std::string& what, const std::string& value) {
  bool ok =
      !value.empty() && value.size() <= 128 && value != "." && value != ".." &&
      value.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == std::string::npos;
  if (!ok) {
    std::string shown = value.size() > 64 ? value.substr(0, 64) + "..." : value;
    throw Error(Exit::usage,
                what + " '" + shown +
                    "' cannot name a directory (letters, digits, '.', '_', '-' only, at most 128, not '.' or '..')",
                "unset it or give a plain job id");
  }
}

std::string owner_name(uid_t uid) {
  if (auto* pw = ::getpwuid(uid); pw && pw->pw_name) {
    return std::string(pw->pw_name) + " (uid " + std::to_string(uid) + ")";
  }
  return "uid " + std::to_string(uid);
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::optional<std::uint64_t> file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return std::nullopt;
  }
  return static_cast<std::uint64_t>(st.st_size);
}

void remove_tree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

std::string dirname_of(const std::string& path) {
  auto p = std::filesystem::path(path).parent_path().string();
  return p;
}

std::string basename_of(const std::string& path) { return std::filesystem::path(path).filename().string(); }

std::string home_dir() {
  if (const char* h = ::getenv("HOME"); h && *h) {
    return h;
  }
  if (auto* pw = ::getpwuid(::geteuid()); pw && pw->pw_dir) {
    return pw->pw_dir;
  }
  return "/tmp";
}

std::string user_name() {
  if (auto* pw = ::getpwuid(::geteuid()); pw && pw->pw_name) {
    return pw->pw_name;
  }
  if (const char* u = ::getenv("USER"); u && *u) {
    return u;
  }
  return std::to_string(::geteuid());
}

std::string state_dir() {
  if (const char* x = ::getenv("LITHOPS_HPC_STATE_DIR"); x && *x) {
    return x;
  }
  // Home, not $XDG_RUNTIME_DIR: on a cluster home is shared, so `status` on a
  // login node sees what rank 0 writes on a compute node.
  return home_dir() + "/.lithops-hpc";
}

}  // namespace lhpc
