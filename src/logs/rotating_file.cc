#include "logs/rotating_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "util/error.h"
#include "util/fs.h"

namespace lhpc::logs {

namespace {

// What is at `name` must be a regular file of ours with one link: another
// user cannot have planted it (the directory is ours), but a symlink or a
// hard link made there earlier would send our writes elsewhere.
void check_ours(int fd, const std::string& shown) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    throw Error(Exit::failure, "cannot stat " + shown + ": " + errno_text(errno));
  }
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || st.st_nlink > 1) {
    throw Error(Exit::failure,
                shown + " is not a regular file of yours with one link (owner " + owner_name(st.st_uid) + ")",
                "remove it; lithops-hpc makes its log files itself");
  }
}

[[noreturn]] void refuse_open(int err, int dir_fd, const std::string& name, const std::string& shown) {
  struct stat st {};
  if (err == ELOOP || (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode))) {
    throw Error(Exit::failure, shown + " is a symbolic link: lithops-hpc writes and reads no log through one",
                "remove it (and look at who made it)");
  }
  throw Error(Exit::failure, "cannot open " + shown + ": " + errno_text(err));
}

}  // namespace

RotatingFile::RotatingFile(int dir_fd, std::string name, std::string shown, std::uint64_t max_bytes)
    : m_dir(dir_fd), m_name(std::move(name)), m_shown(std::move(shown)), m_max(max_bytes < 2 ? 2 : max_bytes) {
  open();
}

void RotatingFile::open() {
  UniqueFd fd(
      ::openat(m_dir, m_name.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600));
  if (!fd) {
    refuse_open(errno, m_dir, m_name, m_shown);
  }
  check_ours(fd.get(), m_shown);
  // O_NONBLOCK was only for opening (a FIFO planted there must not hang us).
  ::fcntl(fd.get(), F_SETFL, O_WRONLY | O_APPEND);
  struct stat st {};
  ::fstat(fd.get(), &st);
  m_size = static_cast<std::uint64_t>(st.st_size);
  m_fd = std::move(fd);
}

void RotatingFile::rotate() {
  std::string old = m_name + ".1";
  if (::renameat(m_dir, m_name.c_str(), m_dir, old.c_str()) != 0) {
    m_error = "cannot rename " + m_shown + " to " + old + ": " + errno_text(errno);
  }
  ++m_rotations;
  m_fd.reset();
  try {
    open();
  } catch (const Error& e) {
    m_error = e.what();
  }
}

bool RotatingFile::write_out(const std::string& data) {
  std::size_t off = 0;
  while (off < data.size() && m_fd) {
    ssize_t n = ::write(m_fd.get(), data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      m_error = "cannot write " + m_shown + ": " + errno_text(errno);
      return false;
    }
    off += static_cast<std::size_t>(n);
    m_size += static_cast<std::uint64_t>(n);
  }
  return off == data.size();
}

bool RotatingFile::append(std::string_view text) {
  bool ok = true;
  std::string out;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto nl = text.find('\n', pos);
    std::size_t end = nl == std::string_view::npos ? text.size() : nl + 1;
    std::string_view line = text.substr(pos, end - pos);
    pos = end;
    bool cut = line.size() > m_max;
    if (cut) {
      line = line.substr(0, m_max - 1);
    }
    std::size_t len = line.size() + (cut ? 1 : 0);
    if (m_size + out.size() + len > m_max && m_size + out.size() > 0) {
      ok = write_out(out) && ok;
      out.clear();
      rotate();
    }
    out.append(line);
    if (cut) {
      out += '\n';
    }
  }
  return write_out(out) && ok;
}

UniqueFd open_log_for_reading(int dir_fd, const std::string& name, const std::string& shown) {
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) {
      return fd;
    }
    refuse_open(errno, dir_fd, name, shown);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    throw Error(Exit::failure, shown + " is not a regular file of yours", "remove it");
  }
  return fd;
}

}  // namespace lhpc::logs
