// `lithops-hpc logs`: reads the per-rank handler logs a record names (those
// on this machine: node-local logs of other nodes are not reachable from
// here), prints each line prefixed with its rank, and can keep reading as
// they grow, across a rotation to .1.
#pragma once

#include <sys/types.h>

#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "logs/place.h"
#include "util/fd.h"

namespace lhpc::logs {

class Reader {
public:
  // `only`: one rank; throws Error(no_deployment) when the job has no such rank.
  Reader(Record rec, std::optional<int> only);

  // Prints every complete line written since the last call ("rank N: line");
  // the first call starts with the rotated .1 file. `at_end`: also a last
  // line without its newline.
  void pump(std::ostream& out, bool at_end = false);
  // Selected ranks whose log is not on this machine (as of the last pump).
  std::vector<int> missing() const;
  // "rank 2 (node n3): /tmp/lithops-hpc-1000/123/rank-2.log"
  std::string describe(int rank) const;
  // For a terminal: control characters in the lines (a function's output
  // may hold escape sequences) are printed as \xNN, tabs kept. Off: raw.
  void escape_for_terminal(bool on) { m_escape = on; }

private:
  struct Tail {
    int rank = 0;
    bool started = false;
    UniqueFd fd;
    ino_t ino = 0;
    std::string partial;
  };
  bool open_dir();
  void start(Tail& t, std::ostream& out);
  void drain(Tail& t, int fd, std::ostream& out, bool at_end);
  void follow_rotation(Tail& t, std::ostream& out);
  void write_line(std::ostream& out, const std::string& prefix, std::string_view line) const;

  Record m_rec;
  UniqueFd m_dir;
  std::vector<Tail> m_tails;
  bool m_escape = false;
};

}  // namespace lhpc::logs
