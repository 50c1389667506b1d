#include "logs/reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "logs/rotating_file.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/strings.h"

namespace lhpc::logs {

Reader::Reader(Record rec, std::optional<int> only) : m_rec(std::move(rec)) {
  int ranks = static_cast<int>(m_rec.nodes.size());
  if (only && (*only < 0 || *only >= ranks)) {
    throw Error(Exit::no_deployment,
                "job " + m_rec.job + " has no rank " + std::to_string(*only) + " (it has " + std::to_string(ranks) +
                    " rank(s): 0 to " + std::to_string(ranks - 1) + ")",
                "give --rank from 0 to " + std::to_string(ranks - 1));
  }
  for (int r = 0; r < ranks; ++r) {
    if (!only || *only == r) {
      m_tails.push_back(Tail{.rank = r});
    }
  }
}

bool Reader::open_dir() {
  if (!m_dir && path_exists(m_rec.dir)) {
    m_dir = open_private_dir(m_rec.dir, false);
  }
  return static_cast<bool>(m_dir);
}

std::string Reader::describe(int rank) const {
  return "rank " + std::to_string(rank) + " (node " + m_rec.nodes.at(static_cast<std::size_t>(rank)) +
         "): " + m_rec.dir + "/" + file_name(rank);
}

std::vector<int> Reader::missing() const {
  std::vector<int> out;
  for (const auto& t : m_tails) {
    if (!t.fd) {
      out.push_back(t.rank);
    }
  }
  return out;
}

void Reader::write_line(std::ostream& out, const std::string& prefix, std::string_view line) const {
  out << prefix;
  if (m_escape) {
    out << escape_controls(line, "\t");
  } else {
    out.write(line.data(), static_cast<std::streamsize>(line.size()));
  }
  out << '\n';
}

void Reader::drain(Tail& t, int fd, std::ostream& out, bool at_end) {
  char buf[65536];
  const std::string prefix = "rank " + std::to_string(t.rank) + ": ";
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    t.partial.append(buf, static_cast<std::size_t>(n));
    std::size_t pos = 0;
    for (std::size_t nl; (nl = t.partial.find('\n', pos)) != std::string::npos; pos = nl + 1) {
      write_line(out, prefix, std::string_view(t.partial).substr(pos, nl - pos));
    }
    t.partial.erase(0, pos);
  }
  if (at_end && !t.partial.empty()) {
    write_line(out, prefix, t.partial);
    t.partial.clear();
  }
}

// First look at a rank: the rotated file's lines, then the current file's.
void Reader::start(Tail& t, std::ostream& out) {
  auto name = file_name(t.rank);
  auto fd = open_log_for_reading(m_dir.get(), name, m_rec.dir + "/" + name);
  if (!fd) {
    return;
  }
  if (auto old = open_log_for_reading(m_dir.get(), name + ".1", m_rec.dir + "/" + name + ".1")) {
    drain(t, old.get(), out, true);
  }
  struct stat st {};
  ::fstat(fd.get(), &st);
  t.ino = st.st_ino;
  t.fd = std::move(fd);
  t.started = true;
}

// The file we read was renamed to .1: finish it, go on with the new one.
void Reader::follow_rotation(Tail& t, std::ostream& out) {
  auto name = file_name(t.rank);
  struct stat st {};
  if (::fstatat(m_dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_ino == t.ino) {
    return;
  }
  auto fd = open_log_for_reading(m_dir.get(), name, m_rec.dir + "/" + name);
  if (!fd) {
    return;
  }
  drain(t, t.fd.get(), out, true);
  ::fstat(fd.get(), &st);
  t.ino = st.st_ino;
  t.fd = std::move(fd);
}

void Reader::pump(std::ostream& out, bool at_end) {
  if (!open_dir()) {
    return;
  }
  for (auto& t : m_tails) {
    if (!t.started) {
      start(t, out);
    }
    if (t.fd) {
      drain(t, t.fd.get(), out, false);
      follow_rotation(t, out);
      drain(t, t.fd.get(), out, at_end);
    }
  }
  out.flush();
}

}  // namespace lhpc::logs
