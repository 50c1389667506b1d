// Health for one rank of a deployment, ready to embed in the event loop:
// the transport on every rank, and on rank 0 the table, the status file and
// the stop request. Every call returns at once except finish(), which is
// bounded by its timeout.
//
// Loop (every rank):
//   each turn:            for (auto c : h.poll()) { drain/stop as asked }
//   every interval:       h.report(my_report)     // rank 0: also writes status, checks stop
//   rank 0 on stop:       h.set_state(draining); h.broadcast(Command::drain)
//   at the end:           auto end = h.finish(final_report, timeout);
//                         if (!end.clean) mpi.abort(Exit::failure);   // else MpiSession finalizes
#pragma once

#include <mpi.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "health/report.h"
#include "health/status_file.h"
#include "health/table.h"
#include "health/transport.h"

namespace lhpc::health {

struct SessionOptions {
  std::string job;          // job id (config::current_placeholders().jobid)
  double interval = 5;      // health.interval
  std::string status_file;  // health.status_file, placeholders expanded; empty: default
  std::string node;         // this rank's node name (rank 0's goes into "rank0.host")
  std::string runtime;      // the Lithops runtime served (status "runtime"); empty: every runtime
  double keep_ended = 0;    // health.keep_ended: rank 0 prunes older ended deployments; 0 keeps them
  Clock clock = Clock::system();
};

// How the shutdown exchange ended.
struct Ending {
  bool clean = true;         // every rank reported stopped and rank 0 said finalize
  std::vector<int> missing;  // rank 0: ranks that never reported stopped
  std::string reason;        // why not clean, for the log
};

class Session {
public:
  // Rank 0 prepares the job directory (throws Error when it cannot) and
  // writes a first status. Not collective: no rank waits for another here.
  Session(MPI_Comm comm, SessionOptions opts);

  bool is_root() const noexcept { return m_transport.is_root(); }
  int rank() const noexcept { return m_transport.rank(); }
  int size() const noexcept { return m_transport.size(); }
  double interval() const noexcept { return m_opts.interval; }

  // Every loop turn; cheap. Rank 0: takes in arrived reports, marks silent
  // ranks, rewrites the status file at once when a rank's state changed;
  // returns nothing. Other ranks: drain/stop commands from rank 0, each kind
  // once (keep-alives and repeats are swallowed).
  std::vector<Command> poll();

  // Every interval, this rank's report (seq, rank, pid, timestamp and, when
  // empty, node are filled in here). Other ranks: sent to rank 0 (never
  // blocks). Rank 0: into the table, then the table ages, the status file is
  // rewritten, the stop request checked, and a keep-alive goes to every rank.
  void report(Report r);

  // Rank 0: `lithops-hpc stop` asked this job to stop (checked in report()).
  bool stop_requested() const noexcept { return m_stop_requested; }
  // Rank 0: to every other rank (non-blocking).
  void broadcast(Command c);
  // Rank 0: the status file's top-level state; rewritten at once.
  void set_state(DeploymentState s);

  // The shutdown exchange; call once, after this rank's own cleanup (no
  // instance, no tasks left), with the same timeout on every rank.
  //  - other ranks send `final_report` (state stopped) and wait for rank 0's
  //    finalize for as long as rank 0 is alive (it sends a keep-alive every
  //    interval from report() and from its own finish()); `timeout` seconds
  //    without a word from rank 0: not clean (rank 0 is gone or hung).
  //  - rank 0 waits until every rank reported stopped: clean -> state
  //    "stopped", finalize sent. It gives up after `timeout`, or as soon as
  //    every rank still missing is unresponsive (silent 3 intervals): state
  //    "failed", the ranks named in the log and in `missing`.
  // Choose `timeout` above the longest drain (deploy.drain_timeout) plus 3
  // intervals, and above rank 0's longest blocking step between report()
  // calls (instance stop, image removal), or a slow but healthy rank 0 ends
  // the job.
  // Not clean means: do NOT call MPI_Finalize (it is collective in Open MPI
  // and would wait for the missing rank forever); call MPI_Abort, which ends
  // every rank, a stopped one included, and makes the launcher exit non-zero.
  Ending finish(Report final_report, double timeout);

  // Rank 0 only (throws std::logic_error elsewhere).
  const Table& table() const;
  const Location& location() const noexcept { return m_loc; }

private:
  void write_status();
  void stamp(Report& r);
  // finish()'s steps.
  Ending await_finalize(double timeout);
  Ending await_stopped(double timeout);
  Ending give_up(const std::vector<int>& missing, bool all_silent, double timeout);
  void release_ranks();

  SessionOptions m_opts;
  Transport m_transport;
  Location m_loc;
  std::unique_ptr<Table> m_table;  // rank 0
  std::uint64_t m_seq = 0;
  bool m_stop_requested = false;
  bool m_seen_drain = false;
  bool m_seen_stop = false;
  double m_last_write = 0;
};

}  // namespace lhpc::health
