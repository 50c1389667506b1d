#include "dispatch/inflight.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "util/error.h"
#include "util/fs.h"

namespace lhpc::dispatch {

namespace {

constexpr std::size_t k_digest_len = 32;
constexpr time_t k_stale_seconds = 7 * 24 * 3600;

bool is_digest(std::string_view s) {
  if (s.size() != k_digest_len) {
    return false;
  }
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
      return false;
    }
  }
  return true;
}

// The digest in a record file, if any; the file is opened without following
// a symlink and must be a regular file of ours.
std::string read_record(int dirfd, const char* name) {
  UniqueFd fd(::openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  struct stat st {};
  if (!fd || ::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    return {};
  }
  char buf[k_digest_len];
  if (::pread(fd.get(), buf, sizeof buf, 0) != static_cast<ssize_t>(sizeof buf)) {
    return {};
  }
  std::string s(buf, sizeof buf);
  return is_digest(s) ? s : std::string();
}

// Whether the record `name` ("<job>-<rank>-<pid>", what the worker names it)
// belongs to a process that is running: its message is being processed now,
// not one that killed it. A name without a pid counts as a dead process's.
bool owner_alive(std::string_view name) {
  auto dash = name.rfind('-');
  if (dash == std::string_view::npos || name.find('-') == dash || dash + 1 == name.size() ||
      name.size() - dash - 1 > 9) {
    return false;
  }
  pid_t pid = 0;
  for (char c : name.substr(dash + 1)) {
    if (c < '0' || c > '9') {
      return false;
    }
    pid = pid * 10 + (c - '0');
  }
  return pid > 1 && (::kill(pid, 0) == 0 || errno == EPERM);
}

}  // namespace

std::string InflightRecord::digest(std::string_view body) {
  XXH128_hash_t h = XXH3_128bits(body.data(), body.size());
  char buf[k_digest_len + 1];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  return buf;
}

InflightRecord::InflightRecord(const std::string& dir, const std::string& name) : m_dir(dir), m_name(name) {
  make_private_dir(m_dir);
  load(/*others_only=*/false);  // our own leftover too: the dispatcher before us with this job and rank
  std::string path = m_dir + "/" + m_name;
  m_fd.reset(::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
  struct stat st {};
  if (!m_fd || ::fstat(m_fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    throw Error(Exit::failure, "cannot use " + path + " to record messages in flight: " + std::strerror(errno),
                "remove it (it must be a regular file of yours) and start again");
  }
  end();
  if (!m_suspects.empty()) {
    spdlog::warn("{} message{} killed an earlier dispatcher on this node: dead-lettered if redelivered",
                 m_suspects.size(), m_suspects.size() == 1 ? "" : "s");
  }
}

InflightRecord::~InflightRecord() {
  m_fd.reset();
  ::unlink((m_dir + "/" + m_name).c_str());
}

void InflightRecord::load(bool others_only) {
  UniqueFd dirfd(::open(m_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dirfd) {
    return;
  }
  DIR* d = ::fdopendir(::dup(dirfd.get()));
  if (!d) {
    return;
  }
  while (auto* e = ::readdir(d)) {
    if (e->d_name[0] == '.' || (others_only && m_name == e->d_name)) {
      continue;
    }
    // Another rank on this node in the middle of a message (a redelivered
    // one is common: a reserve gives tasks back) is no crash.
    if (m_name != e->d_name && owner_alive(e->d_name)) {
      continue;
    }
    if (auto s = read_record(dirfd.get(), e->d_name); !s.empty()) {
      m_suspects.insert(s);
    }
    // Left by dispatchers that died long ago: their messages were redelivered
    // (and dead-lettered) within seconds of their death.
    struct stat st {};
    if (!others_only && ::fstatat(dirfd.get(), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
        st.st_mtime < ::time(nullptr) - k_stale_seconds) {
      ::unlinkat(dirfd.get(), e->d_name, 0);
    }
  }
  ::closedir(d);
}

void InflightRecord::write(const std::string& text) {
  if (m_fd && ::pwrite(m_fd.get(), text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
    spdlog::warn("cannot record the message in flight in {}/{}: {}", m_dir, m_name, std::strerror(errno));
  }
}

void InflightRecord::begin(std::string_view body) { write(digest(body) + "\n"); }

void InflightRecord::end() { write(std::string(k_digest_len, '-') + "\n"); }

bool InflightRecord::killed_before(std::string_view body) {
  // Only for redeliveries (rare): another rank on this node may have died
  // since we started, so look at the files again.
  load(/*others_only=*/true);
  return m_suspects.count(digest(body)) > 0;
}

}  // namespace lhpc::dispatch
