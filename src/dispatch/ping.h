// `lithops-hpc ping`: an end-to-end probe of a running deployment. Publishes
// "ping" messages with reply_to/correlation_id; each dispatcher answers
// through its control handler with {rank, node, echo}. With a deployment's
// ranks known (its status file), every rank is addressed through its own
// queue (protocol.h rank_queue), so each one is reached deterministically and
// the silent ones are named; without, pings go to the task queue and count
// whichever rank takes them.
#pragma once

#include <map>
#include <ostream>
#include <string>

#include "config/config.h"
#include "util/error.h"

namespace lhpc::dispatch {

struct PingTargets {
  std::string job;                   // empty: the task queue, any rank
  int ranks = 0;                     // ranks 0..ranks-1, each through its rank queue
  std::map<int, std::string> nodes;  // for naming the silent ones
  // With no job: this job's standalone worker (rank 0) is pinged through its
  // rank queue when that queue exists, else the task queue.
  std::string local_job;
};

struct PingOptions {
  int count = 10;         // pings to send (to each rank, when ranks are addressed)
  int concurrency = 1;    // pings in flight at once
  double timeout = 10;    // seconds each ping may take before it counts as lost; a rank that
                          // lost one is sent no more (its remaining pings count as lost)
  int expect_ranks = -1;  // fail unless at least this many ranks answered; -1: every addressed rank
};

// Prints one line per rank that answered, one naming each addressed rank that
// did not, and a summary to `out`. Returns Exit::ok when every ping was
// answered (by at least expect_ranks ranks), Exit::failure when a ping went
// unanswered or fewer ranks answered. Throws Error(Exit::broker) when the broker cannot be reached,
// Error(Exit::usage) for bad options.
Exit run_ping(const config::Config& cfg, const PingOptions& opts, const PingTargets& targets, std::ostream& out);

}  // namespace lhpc::dispatch
