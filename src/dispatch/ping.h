// `lithops-hpc ping`: an end-to-end probe of a running deployment. Publishes
// "ping" messages to the task queue with reply_to/correlation_id; each
// dispatcher answers through its control handler with {rank, node, echo}.
#pragma once

#include <ostream>

#include "config/config.h"

namespace lhpc::dispatch {

struct PingOptions {
  int count = 10;           // pings to send
  int concurrency = 1;      // pings in flight at once
  double timeout = 10;      // seconds each ping may take before it counts as lost
  int expect_ranks = 0;     // fail unless at least this many ranks answered
};

// Prints one line per rank that answered and a summary to `out`. Returns
// 0 when every ping was answered (by at least expect_ranks ranks), 1 when a
// ping went unanswered or fewer ranks answered. Throws Error(Exit::broker)
// when the broker cannot be reached, Error(Exit::usage) for bad options.
int run_ping(const config::Config& cfg, const PingOptions& opts, std::ostream& out);

}  // namespace lhpc::dispatch
