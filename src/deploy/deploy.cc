#include "deploy/deploy.h"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <thread>
#include <spdlog/spdlog.h>

#include "health/memory.h"
#include "health/session.h"
#include "slurm/job.h"
#include "stage/stage.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/mpi.h"
#include "util/signals.h"
#include "worker/worker.h"

namespace lhpc::deploy {

using worker::node_cores;
using worker::Worker;
using worker::WorkerStats;

int slots_for_rank(int node_slots, int ranks_on_node, int index_on_node) {
  ranks_on_node = std::max(ranks_on_node, 1);
  int base = node_slots / ranks_on_node;
  int extra = index_on_node < node_slots % ranks_on_node ? 1 : 0;
  return std::max(base + extra, 1);
}

namespace {

using Clock = std::chrono::steady_clock;

// A start-up meeting point with a deadline. A rank that died before it (a
// crash inside MPI_Init, a node lost while starting) would leave the others
// in a blocking collective until the time limit: the sbatch template runs
// srun with --kill-on-bad-exit=0 so that a node lost later does not end the
// job. So the meeting is a non-blocking barrier, and past the deadline every
// waiting rank runs `teardown` (what it started on its own), waits `grace`
// for the others to do the same (they reach their deadlines within seconds;
// MPI_Abort would kill them mid-way), and ends the job with MPI_Abort, which
// also ends a rank that hangs. SIGINT/SIGTERM with nothing to tear down ends
// it at once; otherwise the others get 30 s more to arrive (a signal reaches
// every rank under scancel, and they go on to drain together).
void meet_or_abort(const MpiSession& mpi, std::chrono::duration<double> timeout, const char* point,
                   const std::function<void()>& teardown = {},
                   std::chrono::duration<double> grace = std::chrono::duration<double>(0)) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout);
  int sig = 0;
  // Not a busy poll: ranks may share cores with workers.
  barrier_quietly(mpi.world(), std::chrono::milliseconds(5), [&] {
    if (sig == 0 && (sig = SignalPipe::last_terminating()) != 0) {
      if (!teardown) {
        spdlog::error("interrupted by {} while waiting for every rank to reach \"{}\"; ending the job",
                      sig == SIGINT ? "SIGINT" : "SIGTERM", point);
        spdlog::default_logger()->flush();
        mpi.abort(128 + sig);
      }
      deadline = std::min(deadline, Clock::now() + std::chrono::seconds(30));
    }
    if (Clock::now() < deadline) {
      return;
    }
    spdlog::error("not every rank reached \"{}\" within {}: a rank died or hangs (the launcher's output "
                  "names it); ending the job",
                  point, sig != 0 ? fmt::format("30 s of {}", sig == SIGINT ? "SIGINT" : "SIGTERM")
                                  : fmt::format("{:g} s (deploy.start_timeout)", timeout.count()));
    spdlog::default_logger()->flush();
    if (teardown) {
      teardown();
      std::this_thread::sleep_for(grace);
    }
    mpi.abort(sig != 0 ? 128 + sig : static_cast<int>(Exit::failure));
  });
}

config::Config apply_overrides(config::Config cfg, const Options& o) {
  if (o.transfer) {
    cfg.deploy.transfer = *o.transfer;
  }
  if (o.mode) {
    cfg.deploy.mode = *o.mode;
  }
  if (o.engine) {
    cfg.singularity.engine = *o.engine;
  }
  if (o.slots) {
    cfg.singularity.worker_processes = *o.slots;
  }
  if (o.sif_path) {
    cfg.singularity.sif_path = *o.sif_path;
  }
  if (o.status_file) {
    cfg.health.status_file = *o.status_file;
  }
  if (o.interval) {
    cfg.health.interval = *o.interval;
  }
  cfg.deploy.cleanup = cfg.deploy.cleanup || o.cleanup;
  return cfg;
}

health::State state_of(const WorkerStats& s) {
  if (s.state == "running") {
    return health::State::ready;
  }
  if (s.state == "draining") {
    return health::State::draining;
  }
  if (s.state == "failed") {
    return health::State::failed;
  }
  if (s.state == "stopped") {
    return health::State::stopped;
  }
  return health::State::starting;
}

health::Report make_report(health::State state, const WorkerStats& s, const std::string& node,
                           const std::string& error) {
  health::Report r;
  r.state = state;
  r.slots_busy = s.slots_busy;
  r.slots_total = s.slots_total;
  r.done = s.tasks_done;
  r.failed = s.tasks_failed;
  r.requeued = s.tasks_requeued;
  r.dead_lettered = s.dead_lettered;
  r.broker_connected = s.broker_connected ? 1 : 0;
  r.instance_alive = s.instance_alive ? 1 : 0;
  r.restarts = static_cast<std::uint32_t>(s.restarts);
  auto mem = health::read_memory();
  r.rss_kb = mem.self_kb;
  r.rss_tree_kb = mem.tree_kb;
  health::set_node(r, node);
  health::set_last_error(r, error.empty() ? s.last_error : error);
  return r;
}

// Every rank learns whether all ranks succeeded at a step and each failing
// rank's message, whole (share_outcomes: no fixed-size buffer to cut it).
struct Agreement {
  int ok_ranks = 0;
  std::vector<std::string> errors;  // per rank, empty when it succeeded
};
Agreement agree(MPI_Comm comm, const std::string& my_error) {
  Outcome mine;
  if (!my_error.empty()) {
    mine.error = Error(Exit::engine, my_error);
  }
  Agreement a;
  for (const auto& o : share_outcomes(comm, mine)) {
    a.ok_ranks += o.error ? 0 : 1;
    a.errors.push_back(o.error ? o.error->what() : std::string());
  }
  return a;
}

// Rank 0: every rank's latest report says failed (none is left to serve).
bool all_failed(const health::Table& t) {
  const auto& e = t.entries();
  return !e.empty() && std::all_of(e.begin(), e.end(), [](const health::Table::Entry& x) {
    return x.report && x.report->state == health::State::failed;
  });
}

// Waits up to `ms` for a signal when there is no worker to step.
void idle_wait(SignalPipe& signals, int ms, bool& got_signal) {
  pollfd p{signals.fd(), POLLIN, 0};
  if (::poll(&p, 1, ms) > 0 && !signals.drain().empty()) {
    got_signal = true;
  }
}

int run_rank(MpiSession& mpi, bool slurm_time, const config::Config& cfg_in, const Options& opts) {
  SignalPipe signals({SIGINT, SIGTERM});
  const int rank = mpi.rank();
  const int size = mpi.size();
  MPI_Comm comm = mpi.world();

  // Test hook (integration/slurm-e2e): "R" makes rank R die right after
  // MPI_Init, as one that crashes during MPI start-up does; "R@started" once
  // its worker started, before the second meeting point.
  const char* die_hook = std::getenv("LITHOPS_HPC_TEST_DIE_AT_START");
  const bool dies_here = die_hook != nullptr && std::atoi(die_hook) == rank;
  const bool dies_late = dies_here && std::strstr(die_hook, "@started") != nullptr;
  if (dies_here && !dies_late) {
    std::_Exit(1);
  }
  meet_or_abort(mpi, std::chrono::duration<double>(cfg_in.deploy.start_timeout), "launched");

  // One job id for every rank (rank 0's), so all name the same directories.
  auto ph = config::current_placeholders();
  if (ph.jobid == "local") {
    ph.jobid = "local-" + std::to_string(::getpid());
  }
  ph.jobid = allgather_strings(comm, ph.jobid)[0];
  auto nodes = allgather_strings(comm, ph.node);
  int on_node = 0, index_on_node = 0;
  for (int r = 0; r < size; ++r) {
    if (nodes[static_cast<std::size_t>(r)] == ph.node) {
      index_on_node += r < rank ? 1 : 0;
      ++on_node;
    }
  }
  set_log_prefix("rank " + std::to_string(rank) + " " + ph.node);

  // Same file and environment on every rank: a config error fails every rank alike.
  config::Config cfg = config::expanded(apply_overrides(cfg_in, opts), ph);
  config::require_amqp_url(cfg);
  if (opts.sif.empty() && cfg.singularity.engine != config::Engine::host) {
    throw Error(Exit::usage, "deploy needs --sif PATH with the " + config::to_string(cfg.singularity.engine) + " engine",
                "give the runtime image: lithops-hpc deploy --sif /scratch/rt.sif");
  }
  const int node_slots = cfg.singularity.worker_processes > 0 ? cfg.singularity.worker_processes : node_cores();
  const int slots = slots_for_rank(node_slots, on_node, index_on_node);
  const int required = cfg.deploy.min_ranks > 0 ? std::min(cfg.deploy.min_ranks, size) : size;
  const auto interval = std::chrono::duration<double>(cfg.health.interval);

  health::Session health(comm, {.job = ph.jobid,
                                .interval = cfg.health.interval,
                                .status_file = cfg.health.status_file,
                                .node = ph.node});
  if (rank == 0) {
    spdlog::info("deploying job {} on {} rank(s), {} node(s); status: {}", ph.jobid, size,
                 std::set<std::string>(nodes.begin(), nodes.end()).size(), health.location().status);
  }
  health.report(make_report(health::State::staging, {}, ph.node, ""));

  // Stage: collective; every rank throws the same error.
  stage::Result staged;
  std::string image = opts.sif;
  if (!opts.sif.empty()) {
    try {
      staged = stage::stage_image(comm, {.source = opts.sif,
                                         .sif_dir = cfg.singularity.sif_path,
                                         .transfer = cfg.deploy.transfer,
                                         .chunk_bytes = static_cast<std::size_t>(cfg.deploy.chunk_mib) << 20,
                                         .compress = cfg.deploy.compress,
                                         .jobid = ph.jobid,
                                         .node_id = ph.node,
                                         .progress = rank == 0 && ::isatty(2),
                                         .stall_timeout = cfg.deploy.start_timeout});
      image = staged.local_path;
    } catch (const Error& e) {
      if (rank == 0) {
        health.set_state(health::DeploymentState::failed);
      }
      throw;
    }
  }

  // Start: each rank its instance and worker, then one agreement.
  Worker worker(cfg, {.rank = rank, .node = ph.node, .jobid = ph.jobid, .slots = slots});
  worker.set_signal_pipe(&signals);
  std::string start_error;
  health.report(make_report(health::State::starting, worker.stats(), ph.node, ""));
  try {
    worker.start(image);
    // Handlers and the broker come up asynchronously: a rank is started when
    // its worker runs, or has failed, before the ranks compare notes.
    const auto start_timeout = std::chrono::duration<double>(cfg.deploy.start_timeout);
    auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(start_timeout);
    while (worker.stats().state == "starting" && !worker.finished() && Clock::now() < deadline &&
           SignalPipe::last_terminating() == 0) {
      worker.step(std::chrono::milliseconds(100));
    }
    auto st = worker.stats();
    if (worker.finished() || st.state == "failed") {
      start_error = st.last_error.empty() ? "the worker stopped while starting" : st.last_error;
    } else if (st.state == "starting" && SignalPipe::last_terminating() == 0) {
      start_error = fmt::format("the worker did not become ready within {:g} s (deploy.start_timeout)",
                                start_timeout.count());
    }
  } catch (const Error& e) {
    start_error = e.what();
  }
  if (!start_error.empty()) {
    spdlog::error("failed to start: {}", start_error);
  }
  // What this rank undoes on its own when the job ends: its worker and
  // instance, and (alone on its node) the staged image. Before any exchange
  // with the others: if one is missing the job ends by MPI_Abort, which
  // kills this rank before a collective cleanup could run. Ranks that share
  // a node leave the image to the collective cleanup at the end.
  auto teardown_alone = [&] {
    worker.stop();
    if (cfg.deploy.cleanup && staged.leader && on_node == 1 && !staged.private_dir.empty()) {
      remove_tree(staged.private_dir);
    }
  };
  if (dies_late) {
    std::_Exit(1);
  }
  // Each rank's start above is bounded by start_timeout; the margin covers
  // ranks leaving the stage step at slightly different times.
  const double margin = std::min(60.0, cfg.deploy.start_timeout);
  meet_or_abort(mpi, std::chrono::duration<double>(cfg.deploy.start_timeout + margin), "workers started",
                teardown_alone, std::chrono::duration<double>(std::min(10.0, margin)));
  auto verdict = agree(comm, start_error);
  if (rank == 0) {
    for (int r = 0; r < size; ++r) {
      if (!verdict.errors[static_cast<std::size_t>(r)].empty()) {
        spdlog::error("rank {} on {} failed to start: {}", r, nodes[static_cast<std::size_t>(r)],
                      verdict.errors[static_cast<std::size_t>(r)]);
      }
    }
  }
  if (verdict.ok_ranks < required) {
    worker.stop();
    if (rank == 0) {
      health.report(make_report(health::State::failed, worker.stats(), ph.node, start_error));
      health.set_state(health::DeploymentState::failed);
    }
    throw Error(Exit::engine,
                std::to_string(size - verdict.ok_ranks) + " of " + std::to_string(size) +
                    " rank(s) failed to start (rank 0's log names them)",
                required < size ? "deploy.min_ranks allows " + std::to_string(size - required) + " to fail"
                                : "fix the cause, or let some ranks fail with deploy.min_ranks");
  }
  if (rank == 0) {
    spdlog::info("{} of {} rank(s) started; serving {}", verdict.ok_ranks, size, config::redact_url(cfg.rabbitmq.amqp_url));
  }

  // Run: one loop per rank; MPI only non-blocking from here on.
  const bool started = start_error.empty();
  bool draining = false;
  bool all_ranks_failed = false;
  bool got_signal = false;
  std::optional<slurm::TimeLeftWatch> time_left;
  if (rank == 0 && slurm_time) {
    time_left.emplace(ph.jobid);
  }
  // `tell_worker` is false for signals: the worker reads them from the
  // signal pipe itself (and takes a second one as "stop now").
  auto drain_all = [&](const std::string& why, bool tell_worker = true) {
    if (draining) {
      return;
    }
    draining = true;
    spdlog::info("draining: {}", why);
    if (rank == 0) {
      health.set_state(health::DeploymentState::draining);
      health.broadcast(health::Command::drain);
    }
    if (tell_worker) {
      worker.request_drain();
    }
  };
  auto next_report = Clock::now();
  while (true) {
    if (started && !worker.finished()) {
      worker.step(std::chrono::milliseconds(100));
    } else {
      idle_wait(signals, 100, got_signal);
    }
    if (got_signal || (SignalPipe::last_terminating() != 0 && !draining)) {
      drain_all(SignalPipe::last_terminating() == SIGINT ? "SIGINT" : "SIGTERM", false);
    }
    for (auto c : health.poll()) {
      if (c == health::Command::drain || c == health::Command::stop) {
        drain_all(std::string("rank 0 asked to ") + std::string(health::command_name(c)));
      }
    }
    if (rank == 0 && !draining) {
      if (all_failed(health.table())) {
        drain_all("every rank has failed");
        all_ranks_failed = true;
      } else if (health.stop_requested()) {
        drain_all("lithops-hpc stop");
      } else if (time_left) {
        if (auto left = time_left->current(); left && *left < cfg.deploy.drain_before_end) {
          drain_all("Slurm time limit in " + std::to_string(static_cast<int>(*left)) + " s");
        }
      }
    }
    if (Clock::now() >= next_report) {
      auto st = worker.stats();
      auto state = started ? state_of(st) : health::State::failed;
      if (state == health::State::stopped && !draining) {
        state = health::State::failed;
      }
      health.report(make_report(state, st, ph.node, start_error));
      next_report = Clock::now() + std::chrono::duration_cast<Clock::duration>(interval);
    }
    // A finished worker waits for the drain, so the shutdown exchange starts
    // together on every rank; a failed one keeps reporting "failed" meanwhile.
    if (draining && (!started || worker.finished())) {
      break;
    }
  }

  teardown_alone();
  auto final_stats = worker.stats();
  auto final_report = make_report(health::State::stopped, final_stats, ph.node, start_error);
  // Long enough for the slowest healthy drain (and rank 0's own cleanup
  // between reports); only a rank that is really gone runs it out.
  auto ending = health.finish(final_report, cfg.deploy.drain_timeout + 3 * cfg.health.interval + 30);
  if (!ending.clean) {
    spdlog::error("shutdown incomplete: {}", ending.reason);
    if (staged.leader && cfg.deploy.cleanup && !staged.private_dir.empty()) {
      remove_tree(staged.private_dir);  // no collective: a rank is missing
    }
    mpi.abort(static_cast<int>(Exit::failure));
  }
  if (cfg.deploy.cleanup && !opts.sif.empty()) {
    stage::cleanup(comm, staged);
  }
  if (rank == 0) {
    spdlog::info("stopped: {} task(s) done, {} failed, {} requeued, {} dead-lettered on this rank", final_stats.tasks_done,
                 final_stats.tasks_failed, final_stats.tasks_requeued, final_stats.dead_lettered);
  }
  // Ended by a drain (signal, stop, time limit): success; unless the drain
  // came because every rank's worker had failed for good.
  return all_ranks_failed ? static_cast<int>(Exit::engine) : 0;
}

}  // namespace

int run(const config::Config& cfg_in, const Options& opts) {
  // Before MPI_Init: libslurm's first contact may take seconds, and its
  // answer decides whether rank 0 watches the time limit.
  bool slurm_time = slurm::in_allocation() && slurm::libslurm_available();
  MpiSession mpi(nullptr, nullptr);
  try {
    return run_rank(mpi, slurm_time, cfg_in, opts);
  } catch (const Error& e) {
    log_collective_error(mpi.rank(), e);
    return static_cast<int>(e.code());
  }
}

}  // namespace lhpc::deploy
