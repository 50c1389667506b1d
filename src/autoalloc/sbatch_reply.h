// Reading what `sbatch --parsable` answered, strictly: a site's sbatch may be
// a wrapper that prints a banner, a quota notice or a warning around the
// reply, and taking its whole stdout as the job id made every job look failed
// and orphaned the real ones. Pure (tested as data, fuzzed in
// tests/fuzz/fuzz_sbatch_reply.cc); slurm_scheduler.* runs sbatch.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace lhpc::autoalloc {

struct SbatchReply {
  std::optional<std::string> job;  // digits only, 1 .. 4294967295 (Slurm's job ids are 32-bit)
  std::string cluster;             // after ';' on a multi-cluster site, else empty
  // No job: why, with sbatch's own words (stderr, else stdout): control
  // characters replaced, broker URLs' passwords redacted, at most
  // k_reply_shown bytes.
  std::string refusal;
  // Exit code 0 but no reply line: sbatch may have submitted a job we could
  // not read (the controller looks for it by name).
  bool unreadable_success = false;
};

inline constexpr std::size_t k_reply_shown = 1024;

// The reply is the last non-empty line of stdout (spaces and CR trimmed) that
// reads `JOBID` or `JOBID;CLUSTER` (CLUSTER: 1-64 of [A-Za-z0-9._-]); lines
// around it (a wrapper's banner before or after) are ignored. Anything else,
// or a non-zero exit, is a refusal.
SbatchReply parse_sbatch_reply(int exit_code, std::string_view out, std::string_view err);

}  // namespace lhpc::autoalloc
