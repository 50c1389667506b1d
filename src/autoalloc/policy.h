// The autoalloc controller's decisions, kept free of I/O so they are tested
// with data: a snapshot of demand (the queue) and supply (the deployments it
// submitted) goes in, actions come out. Everything that talks to Slurm, the
// broker or the file system lives in controller.*; this file only judges.
//
// Lessons taken from HyperQueue's autoalloc, Parsl blocks and dask-jobqueue
// adaptive, whose trackers show loops that storm or stall:
//  - at most one submission per poll, and never while a refused submission's
//    backoff runs, so a broken partition or QOS cannot become a storm;
//  - capacity already asked for (pending and starting jobs) counts as supply,
//    so a slow queue does not make it ask again and again for the same work;
//  - jobs that fail at start K times in a row stop submissions altogether
//    (a bad image or config would otherwise burn allocations forever);
//  - a job near its time limit while work remains gets its successor early,
//    so the queue does not stall between the old job's drain and the new one.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "util/names.h"

namespace lhpc::autoalloc {

struct Limits {
  int max_nodes = 4;           // held: pending + starting + serving + draining
  int nodes_per_job = 1;       // -N of each submission
  int max_pending = 1;         // jobs waiting in Slurm's queue
  int min_nodes = 0;           // kept warm even without work
  double idle_timeout = 300;   // seconds without a task before a deployment is retired
  double renew_before = 300;   // seconds before the time limit a successor is submitted
  int max_start_failures = 3;  // K: jobs failing at start in a row stop submissions
  double backoff_first = 10;   // seconds after the first refused submission
  double backoff_cap = 600;    // the longest wait between refused submissions
  double halt_cooloff = 1800;  // seconds a halt after start failures lasts before one probe job
};

// Where one of our deployments is, as seen from Slurm and its status file.
enum class Phase {
  pending,   // in Slurm's queue, no nodes yet
  starting,  // running, no rank ready yet (staging, starting workers)
  serving,   // at least one rank ready
  draining,  // asked to stop (by us or its time limit), or its ranks drain
  ended,     // gone from Slurm's queue or in a final state
};
// As state.json and `status` spell it.
inline constexpr Names<Phase, 5> k_phase_names{{{
    {Phase::pending, "pending"},
    {Phase::starting, "starting"},
    {Phase::serving, "serving"},
    {Phase::draining, "draining"},
    {Phase::ended, "ended"},
}}};

struct JobSnapshot {
  std::string id;
  Phase phase = Phase::pending;
  int nodes = 0;
  int ready_ranks = 0;
  int slots_total = 0;  // over its ready ranks
  int slots_busy = 0;
  std::optional<double> seconds_left;  // until its Slurm time limit; nullopt: none or unknown
  double idle_for = 0;                 // seconds since it last ran a task (or became serving)
  bool stop_requested = false;         // we asked it to drain already
  bool renewed = false;                // a successor was submitted for it already
};

struct Snapshot {
  double now = 0;                      // unix seconds
  std::optional<std::uint64_t> ready;  // messages ready in the queue; nullopt: broker not reached
  std::optional<int> consumers;
  double demand_idle_for = 0;  // seconds since the queue last had ready messages
  std::vector<JobSnapshot> jobs;
  int default_slots_per_node = 1;  // configured: before any deployment has said how many it has
  int learned_slots_per_node = 0;  // reported by an earlier deployment (0: none yet); beats the default
  double backoff_until = 0;        // no submission before this (unix seconds)
  bool halted = false;             // K start failures in a row: no more submissions
  bool submitting = true;          // false once SIGTERM asked the controller to end
};

enum class ActionKind { submit, retire, cancel };
inline constexpr Names<ActionKind, 3> k_action_kind_names{
    {{{ActionKind::submit, "submit"}, {ActionKind::retire, "retire"}, {ActionKind::cancel, "cancel"}}}};

struct Action {
  ActionKind kind = ActionKind::submit;
  std::string job;  // retire/cancel: which; submit: the job it renews, if any
  int nodes = 0;    // submit: -N
  std::string why;  // for the log and the status line
};

struct Decision {
  std::vector<Action> actions;
  std::string next;  // what the controller will do next and why (status line)
};

// Aggregates for the status line and the limits.
struct Supply {
  int held_nodes = 0;  // every job not ended
  int pending_jobs = 0;
  int coming_nodes = 0;  // pending + starting
  int serving_nodes = 0;
  int free_slots = 0;  // of serving jobs not draining
  int busy_slots = 0;
  int slots_per_node = 1;  // learned from serving jobs, else the default
};
Supply supply_of(const Snapshot& s);

Decision decide(const Snapshot& s, const Limits& l);

// Seconds to wait after the n-th refused submission in a row (n >= 1):
// first, 2*first, 4*first ... capped.
double backoff_delay(int refused_in_row, const Limits& l);

// Jobs that end before any rank was ready, K in a row, halt submissions: a
// bad image or configuration would otherwise burn allocations forever. The
// halt is not forever either: it lifts as soon as any job serves (one still
// in flight when it began, or adopted), or after Limits::halt_cooloff, when
// one probe job is let through; if that one fails at start too, the halt
// returns at once for another cool-off.
struct StartFailures {
  int in_row = 0;
  std::vector<std::string> outputs;  // of the jobs that failed in this row
  bool halted = false;
  double halted_at = 0;  // unix seconds
};
// A job served: the row is broken and a halt lifted. True if it lifted one.
bool on_served(StartFailures& f);
// A job ended before serving (`out`: its batch output). True when this one
// halts submissions.
bool on_start_failure(StartFailures& f, const std::string& out, double now, const Limits& l);
// Lifts a halt whose cool-off has passed, leaving one failure to spare
// (in_row = K-1). True if it lifted one.
bool cool_off(StartFailures& f, double now, const Limits& l);

// Per-job memory the controller keeps between polls to know how long a
// deployment has been idle: it is busy while a slot is busy or its done
// count moves.
struct IdleClock {
  double since = 0;             // last time it was seen working (or became serving)
  unsigned long long done = 0;  // done count then
  bool started = false;
};
// Returns seconds idle at `now` after taking this observation into account.
double observe_idle(IdleClock& c, double now, int busy, unsigned long long done);

}  // namespace lhpc::autoalloc

namespace lhpc::autoalloc {

// Slurm's time formats (sbatch --time, squeue %L): "M", "M:S", "H:M:S",
// "D-H", "D-H:M", "D-H:M:S"; nullopt for "UNLIMITED", "INVALID", "NOT_SET"
// or anything malformed. Seconds.
std::optional<double> parse_slurm_time(const std::string& text);

}  // namespace lhpc::autoalloc
