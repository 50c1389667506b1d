#include "util/fs.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "util/error.h"
#include "util/fd.h"

namespace lhpc {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(Exit::failure, "cannot read " + path + ": " + errno_text(errno));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file_atomic(const std::string& path, const std::string& data, mode_t mode) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
  if (!fd) {
    throw Error(Exit::failure, "cannot write " + tmp + ": " + errno_text(errno));
  }
  ::fchmod(fd.get(), mode);  // umask must not widen or narrow what we promise
  std::size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd.get(), data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      int err = errno;
      ::unlink(tmp.c_str());
      throw Error(Exit::failure, "cannot write " + tmp + ": " + errno_text(err));
    }
    off += static_cast<std::size_t>(n);
  }
  ::fsync(fd.get());
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error(Exit::failure, "cannot rename " + tmp + " to " + path + ": " + errno_text(err));
  }
}

void mkdirs(const std::string& path, mode_t mode) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) {
    throw Error(Exit::failure, "cannot create directory " + path + ": " + ec.message());
  }
  (void)mode;
}

void make_private_dir(const std::string& path) {
  auto parent = dirname_of(path);
  if (!parent.empty() && !path_exists(parent)) {
    mkdirs(parent);
  }
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    throw Error(Exit::failure, "cannot create directory " + path + ": " + errno_text(errno),
                "check that " + parent + " exists and is writable by you");
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    throw Error(Exit::failure, "cannot stat " + path + ": " + errno_text(errno));
  }
  if (!S_ISDIR(st.st_mode)) {
    throw Error(Exit::failure, path + " exists and is not a directory (a symlink?)", "remove it and try again");
  }
  if (st.st_uid != ::geteuid()) {
    throw Error(Exit::failure, path + " is owned by uid " + std::to_string(st.st_uid) + ", not by you",
                "someone else created it: remove it or use another sif_path");
  }
  if ((st.st_mode & 0077) != 0 && ::chmod(path.c_str(), 0700) != 0) {
    throw Error(Exit::failure, "cannot make " + path + " private: " + errno_text(errno));
  }
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
