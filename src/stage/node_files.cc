#include "stage/node_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>

#include "stage/agreement.h"
#include "stage/hash.h"
#include "stage/layout.h"
#include "stage/progress.h"
#include "stage/record.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/strings.h"

namespace lhpc::stage {

namespace {

// A record is a few hundred bytes: a bigger file is not one.
constexpr off_t k_max_record = 64 << 10;

std::string marker_name(const std::string& node) {
  std::string n = node;
  std::replace(n.begin(), n.end(), '/', '_');
  return ".node-" + n;
}

std::vector<std::string> list_dir(int dir_fd) {
  std::vector<std::string> out;
  int dup = ::openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dup < 0) {
    return out;
  }
  std::unique_ptr<DIR, int (*)(DIR*)> d(::fdopendir(dup), ::closedir);
  if (!d) {
    ::close(dup);
    return out;
  }
  while (auto* e = ::readdir(d.get())) {
    std::string n = e->d_name;
    if (n != "." && n != "..") {
      out.push_back(n);
    }
  }
  return out;
}

// A regular file in `dir_fd`, never through a symlink, never waiting on a FIFO.
UniqueFd open_regular_at(int dir_fd, const std::string& name, int flags, struct stat* st) {
  UniqueFd fd(::openat(dir_fd, name.c_str(), flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd || ::fstat(fd.get(), st) != 0 || !S_ISREG(st->st_mode)) {
    return UniqueFd();
  }
  return fd;
}

std::optional<std::string> read_record_text(int dir_fd, const std::string& name) {
  struct stat st {};
  auto fd = open_regular_at(dir_fd, name, O_RDONLY, &st);
  if (!fd || st.st_size > k_max_record) {
    return std::nullopt;
  }
  std::string text(static_cast<std::size_t>(st.st_size), '\0');
  ssize_t n = ::pread(fd.get(), text.data(), text.size(), 0);
  if (n < 0) {
    return std::nullopt;
  }
  text.resize(static_cast<std::size_t>(n));
  return text;
}

std::optional<std::string> verified_hash_at(int dir_fd, const std::string& image) {
  auto text = read_record_text(dir_fd, basename_of(record_path(image)));
  struct stat st {};
  if (!text || ::fstatat(dir_fd, image.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) {
    return std::nullopt;
  }
  auto rec = parse_record(*text);
  if (rec && record_matches(*rec, stamp_of(st))) {
    return rec->hash_hex;
  }
  return std::nullopt;
}

Error stage_error(const Error& e) { return Error(Exit::stage, e.what(), e.hint()); }

}  // namespace

std::string NodeWork::name() const { return basename_of(dir); }

NodeWork::~NodeWork() {
  fd.reset();
  if (committed || !dir_fd) {
    return;
  }
  if (!partial.empty()) {
    ::unlinkat(dir_fd.get(), basename_of(partial).c_str(), 0);
  }
  if (!marker.empty()) {
    ::unlinkat(dir_fd.get(), marker.c_str(), 0);
  }
  // Only when empty, so never what was there before. Every leader that
  // marked the directory tries: when nodes wrongly share it, the last one
  // to remove its marker removes the directory.
  if ((made_dir || !marker.empty()) && sif_fd) {
    ::unlinkat(sif_fd.get(), name().c_str(), AT_REMOVEDIR);
  }
}

void open_node_dir(NodeWork& nw, const std::string& sif_dir, const std::string& jobid) {
  check_path_component("the job id ($SLURM_JOB_ID or $LITHOPS_HPC_JOB_ID)", jobid);
  nw.sif_dir = sif_dir;
  nw.dir = private_dir(sif_dir, ::geteuid(), jobid);
  if (!path_exists(sif_dir)) {
    return;  // nothing staged yet; prepare_private_dir creates it
  }
  try {
    nw.sif_fd = open_trusted_dir(sif_dir);
    struct stat st {};
    if (::fstatat(nw.sif_fd.get(), nw.name().c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
      nw.dir_fd = open_private_dir_at(nw.sif_fd.get(), nw.name(), nw.dir, false);
    }
  } catch (const Error& e) {
    throw stage_error(e);
  }
}

std::optional<std::string> verified_hash(const NodeWork& nw, const std::string& image) {
  return nw.dir_fd ? verified_hash_at(nw.dir_fd.get(), image) : std::nullopt;
}

nlohmann::json sibling_copies(const NodeWork& nw, const std::string& image) {
  nlohmann::json out = nlohmann::json::array();
  if (!nw.sif_fd) {
    return out;
  }
  auto prefix = private_dir_prefix(::geteuid());
  for (const auto& n : list_dir(nw.sif_fd.get())) {
    if (!starts_with(n, prefix) || n == nw.name()) {
      continue;
    }
    UniqueFd d;
    try {
      d = open_private_dir_at(nw.sif_fd.get(), n, n, false);
    } catch (const Error&) {
      continue;  // not ours, or not private: not a copy we may use
    }
    if (auto h = verified_hash_at(d.get(), image)) {
      out.push_back({{"path", dirname_of(nw.dir) + "/" + n + "/" + image}, {"hash", *h}});
      if (out.size() == 8) {
        break;
      }
    }
  }
  return out;
}

void prepare_private_dir(NodeWork& nw, const std::string& node) {
  if (!nw.dir_fd) {
    try {
      if (!nw.sif_fd) {
        mkdirs(nw.sif_dir, 0755);
        nw.sif_fd = open_trusted_dir(nw.sif_dir);
      }
      nw.dir_fd = open_private_dir_at(nw.sif_fd.get(), nw.name(), nw.dir, true, &nw.made_dir);
    } catch (const Error& e) {
      throw stage_error(e);
    }
  }
  const auto marker = marker_name(node);
  UniqueFd m(::openat(nw.dir_fd.get(), marker.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (m) {
    nw.marker = marker;
  } else if (errno != EEXIST) {
    throw Error(Exit::stage, "cannot write in " + nw.dir + ": " + errno_text(errno));
  }
}

void refuse_shared_dir(const NodeWork& nw, const std::string& node) {
  auto own = marker_name(node);
  for (const auto& n : list_dir(nw.dir_fd.get())) {
    if (starts_with(n, ".node-") && n != own) {
      throw Error(Exit::usage, nw.dir + " is shared with another node (" + n.substr(6) + " wrote there too)",
                  "for a shared file system use --transfer none; else give each node its own sif_path (e.g. /tmp, "
                  "or add %n)");
    }
  }
}

void open_partial(NodeWork& nw, const std::string& staged, std::uint64_t size) {
  nw.partial = partial_path(staged, ::getpid());
  nw.fd.reset(::openat(nw.dir_fd.get(), basename_of(nw.partial).c_str(),
                       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!nw.fd) {
    nw.partial.clear();  // not ours to remove
    throw Error(Exit::stage, "cannot create a file in " + nw.dir + ": " + errno_text(errno));
  }
  // A disk without room fails here, before any byte moves. statvfs, not
  // fallocate: preallocated (unwritten) extents cost ext4 a conversion on
  // every write, and a write that still hits ENOSPC is handled anyway.
  struct statvfs vfs {};
  if (::fstatvfs(nw.fd.get(), &vfs) == 0) {
    const auto room = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    if (room < size) {
      throw Error(Exit::stage,
                  "not enough space in " + nw.dir + ": " + human_bytes(static_cast<double>(size)) + " needed, " +
                      human_bytes(static_cast<double>(room)) + " free",
                  "free space there or choose another sif_path");
    }
  }
}

std::string link_earlier_copy(NodeWork& nw, const std::string& staged, const std::string& from, std::size_t chunk) {
  const auto from_dir = basename_of(dirname_of(from));
  UniqueFd d;
  try {
    d = open_private_dir_at(nw.sif_fd.get(), from_dir, dirname_of(from), false);
  } catch (const Error& e) {
    throw stage_error(e);
  }
  nw.partial = partial_path(staged, ::getpid());
  const auto part = basename_of(nw.partial);
  if (::linkat(d.get(), basename_of(from).c_str(), nw.dir_fd.get(), part.c_str(), 0) != 0) {
    int err = errno;
    nw.partial.clear();
    throw Error(Exit::stage, "cannot link " + from + " to " + nw.dir + ": " + errno_text(err));
  }
  struct stat st {};
  auto fd = open_regular_at(nw.dir_fd.get(), part, O_RDONLY, &st);
  if (!fd) {
    throw Error(Exit::stage, "cannot read " + nw.partial + " after linking it");
  }
  return to_hex(hash_fd(fd.get(), nw.partial, chunk, throw_if_signalled));
}

std::string hash_sbcast_partial(const NodeWork& nw, std::size_t chunk) {
  struct stat st {};
  auto fd = open_regular_at(nw.dir_fd.get(), basename_of(nw.partial), O_RDONLY, &st);
  if (!fd) {
    throw Error(Exit::stage, "sbcast reported success but " + nw.partial + " is missing or not a regular file");
  }
  if (::fchmod(fd.get(), 0600) != 0) {
    throw Error(Exit::stage, "cannot make " + nw.partial + " private: " + errno_text(errno));
  }
  return to_hex(hash_fd(fd.get(), nw.partial, chunk, throw_if_signalled));
}

void drop_partial(NodeWork& nw) {
  ::unlinkat(nw.dir_fd.get(), basename_of(nw.partial).c_str(), 0);
  nw.partial.clear();
}

void commit(NodeWork& nw, const std::string& staged, const std::string& hash, std::uint64_t size,
            const std::string& source) {
  nw.fd.reset();
  const auto image = basename_of(staged);
  if (::renameat(nw.dir_fd.get(), basename_of(nw.partial).c_str(), nw.dir_fd.get(), image.c_str()) != 0) {
    throw Error(Exit::stage, "cannot rename " + nw.partial + " to " + staged + ": " + errno_text(errno));
  }
  nw.committed = true;
  struct stat st {};
  if (::fstatat(nw.dir_fd.get(), image.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    throw Error(Exit::stage, "cannot stat " + staged + " after renaming it: " + errno_text(errno));
  }
  try {
    write_file_atomic_at(
        nw.dir_fd.get(), basename_of(record_path(staged)),
        to_json_text(StageRecord{.hash_hex = hash, .size = size, .stamp = stamp_of(st), .source = source}), 0600,
        record_path(staged));
  } catch (const Error& e) {
    throw stage_error(e);
  }
}

void remove_stale_partials(const NodeWork& nw, const std::string& staged, bool include_sbcast) {
  for (const auto& n : list_dir(nw.dir_fd.get())) {
    if (!is_partial_of(staged, n)) {
      continue;
    }
    pid_t pid = partial_pid(staged, n);
    bool sb = pid < 0;  // the sbcast partial has no pid
    if ((sb && include_sbcast) || (pid > 0 && pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH)) {
      ::unlinkat(nw.dir_fd.get(), n.c_str(), 0);
    }
  }
}

void remove_staged(const std::string& dir, const std::string& staged) {
  NodeWork nw;
  nw.committed = true;  // removes by itself below, nothing on the way out
  nw.dir = dir;
  try {
    nw.sif_fd = open_trusted_dir(dirname_of(dir));
    struct stat st {};
    if (::fstatat(nw.sif_fd.get(), nw.name().c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
      return;  // nothing was staged here
    }
    nw.dir_fd = open_private_dir_at(nw.sif_fd.get(), nw.name(), dir, false);
  } catch (const Error& e) {
    throw stage_error(e);
  }
  for (const auto& p : {staged, record_path(staged)}) {
    if (::unlinkat(nw.dir_fd.get(), basename_of(p).c_str(), 0) != 0 && errno != ENOENT) {
      throw Error(Exit::stage, "cannot remove " + p + ": " + errno_text(errno));
    }
  }
  remove_stale_partials(nw, staged, true);
  auto left = list_dir(nw.dir_fd.get());
  bool only_markers =
      std::all_of(left.begin(), left.end(), [](const std::string& n) { return starts_with(n, ".node-"); });
  if (only_markers) {
    for (const auto& n : left) {
      ::unlinkat(nw.dir_fd.get(), n.c_str(), 0);
    }
    if (::unlinkat(nw.sif_fd.get(), nw.name().c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT && errno != ENOTEMPTY) {
      throw Error(Exit::stage, "cannot remove " + dir + ": " + errno_text(errno));
    }
  }
}

}  // namespace lhpc::stage
