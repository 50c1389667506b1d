// Where a deployment's per-rank handler logs live (logs.dir), how a rank
// opens that directory safely, and the record that tells `lithops-hpc logs`
// where to look:
//   node   /tmp/lithops-hpc-<uid>/<job>/rank-<N>.log on each rank's node
//   state  <state dir>/jobs/<job>/logs/rank-<N>.log (shared home: every rank's)
//   PATH   PATH/<job>/rank-<N>.log
// Each directory below the trusted root is ours and 0700, reached through
// directory fds without following a symlink (util/fs.h's rules).
// The record is <state dir>/jobs/<job>/logs.json (0600), written by rank 0.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "util/fd.h"

namespace lhpc::logs {

struct Place {
  std::string where;               // "node", "state" or "path"
  std::string root;                // a trusted directory: /tmp, the state dir or PATH
  bool root_private = false;       // the root itself must be ours and 0700 (state dir); PATH only when made here
  std::vector<std::string> chain;  // private directories below the root, created as needed
  std::string dir;                 // root/chain...: holds the rank files
};

// `setting`: logs.dir with placeholders expanded (config::logs_dir_error
// already passed). Throws Error(usage) for a job id that cannot name a directory.
Place place_for(const std::string& setting, const std::string& job);
std::string file_name(int rank);  // "rank-3.log"

// The directory of `place`, created (0700) when `create`; an invalid fd when
// it does not exist and !create. Throws Error naming what is not trusted.
UniqueFd open_dir(const Place& place, bool create);

struct Record {
  std::string job;
  std::string where;
  std::string dir;
  std::uint64_t max_bytes = 0;
  std::vector<std::string> nodes;  // rank -> node
};
// Rank 0 (or `lithops-hpc worker`) at start. Throws Error naming the path.
void write_record(const Record& r);
// place_for, then its record with `nodes` (rank -> node): what rank 0 (or
// `lithops-hpc worker`) does at start. Throws Error naming the path.
Place record_place(const std::string& setting, const std::string& job, std::uint64_t max_bytes,
                   std::vector<std::string> nodes);
// nullopt when the job has no record here.
std::optional<Record> read_record(const std::string& job);
// The job whose record was written last (for `logs` without a job id).
std::optional<std::string> newest_record_job();

}  // namespace lhpc::logs
