#include "deploy/deploy.h"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <thread>

#include "config/image_labels.h"
#include "gpu/memory.h"
#include "health/memory.h"
#include "health/progress.h"
#include "health/session.h"
#include "lhpc_build_config.h"
#include "logs/place.h"
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

// How the job ends when a meeting point gives up: as the signal that ended
// the wait asked, else as a failure.
Exit abort_outcome(int sig) { return sig != 0 ? exit_for_signal(sig) : Exit::failure; }

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
// `tick` runs between the barrier's tests (health keeps going while a rank waits).
void meet_or_abort(const MpiSession& mpi, std::chrono::duration<double> timeout, const char* point,
                   const std::function<void()>& teardown = {},
                   std::chrono::duration<double> grace = std::chrono::duration<double>(0),
                   const std::function<void()>& tick = {}) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout);
  int sig = 0;
  // Not a busy poll: ranks may share cores with workers.
  barrier_quietly(mpi.world(), std::chrono::milliseconds(5), [&] {
    if (tick) {
      tick();
    }
    if (sig == 0 && (sig = SignalPipe::last_terminating()) != 0) {
      if (!teardown) {
        spdlog::error("interrupted by {} while waiting for every rank to reach \"{}\"; ending the job",
                      sig == SIGINT ? "SIGINT" : "SIGTERM", point);
        spdlog::default_logger()->flush();
        mpi.abort(abort_outcome(sig));
      }
      deadline = std::min(deadline, Clock::now() + std::chrono::seconds(30));
    }
    if (Clock::now() < deadline) {
      return;
    }
    spdlog::error(
        "not every rank reached \"{}\" within {}: a rank died or hangs (the launcher's output "
        "names it); ending the job",
        point,
        sig != 0 ? fmt::format("30 s of {}", sig == SIGINT ? "SIGINT" : "SIGTERM")
                 : fmt::format("{:g} s (deploy.start_timeout)", timeout.count()));
    spdlog::default_logger()->flush();
    if (teardown) {
      teardown();
      std::this_thread::sleep_for(grace);
    }
    mpi.abort(abort_outcome(sig));
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
  if (o.logs_dir) {
    cfg.logs.dir = *o.logs_dir;
  }
  cfg.deploy.cleanup = cfg.deploy.cleanup || o.cleanup;
  return cfg;
}

// The one place a worker's state becomes a health state.
health::State state_of(worker::State s) {
  switch (s) {
    case worker::State::created:
    case worker::State::starting: return health::State::starting;
    case worker::State::running: return health::State::ready;
    case worker::State::draining: return health::State::draining;
    case worker::State::failed: return health::State::failed;
    case worker::State::stopped: return health::State::stopped;
  }
  return health::State::starting;
}

health::Report make_report(health::State state, const WorkerStats& s, const std::string& node,
                           const std::string& error) {
  health::Report r;
  // Never "ready" while it consumes nothing (the broker lost, a consumer
  // the broker cancelled not yet restored).
  r.state = state == health::State::ready && !s.consuming ? health::State::reconnecting : state;
  r.slots_busy = s.slots_busy;
  r.slots_total = s.slots_total;
  health::set_gpus(r, s.gpus);
  health::set_gpus_out(r, s.gpus_out);
  r.done = s.tasks_done;
  r.failed = s.tasks_failed;
  r.requeued = s.tasks_requeued;
  r.dead_lettered = s.dead_lettered;
  r.broker_connected = s.broker_connected ? 1 : 0;
  r.consuming = s.consuming ? 1 : 0;
  r.broker_blocked = s.broker_blocked ? 1 : 0;
  r.duplicates = s.duplicates;
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

// One rank's run, phase by phase: meet, stage, start, serve, finish. The
// phases share this state; each is a member so the order reads in run().
class RankRun {
public:
  RankRun(MpiSession& mpi, bool slurm_time, const Options& opts)
      : m_mpi(mpi),
        m_slurm_time(slurm_time),
        m_opts(opts),
        m_rank(mpi.rank()),
        m_size(mpi.size()),
        m_comm(mpi.world()) {}

  Exit run(const config::Config& cfg_in) {
    meet(cfg_in);
    stage();
    start();
    bool all_ranks_failed = serve();
    return finish(all_ranks_failed);
  }

private:
  void meet(const config::Config& cfg_in);
  void configure(const config::Config& cfg_in);
  void stage();
  void start();
  std::string start_worker();
  void agree_started();
  bool serve();
  void drain_all(const std::string& why, bool tell_worker = true);
  void decide_for_all(std::optional<slurm::TimeLeftWatch>& time_left);
  Exit finish(bool all_ranks_failed);
  void teardown_alone();
  void record_logs() const;
  void report(health::State state, const std::string& error) {
    auto stats = m_worker ? m_worker->stats() : WorkerStats{};
    auto r = make_report(state, stats, m_ph.node, error);
    health::set_gpu_memory(r, gpu_memory(stats));
    m_health->report(r);
    m_next_report = Clock::now() +
                    std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(m_cfg.health.interval));
  }
  void keep_reporting(health::State state);
  // An NVIDIA GPU runtime's memory per device (nvidia-smi), asked at most
  // every k_gpu_memory_every; the last figures in between.
  std::vector<health::GpuMemory> gpu_memory(const WorkerStats& s);
  static constexpr std::chrono::seconds k_gpu_memory_every{10};
  Clock::time_point m_gpu_memory_at{};
  std::vector<gpu::Memory> m_gpu_memory;

  // Signals first: one arriving while the instance starts is kept for the loop.
  SignalPipe m_signals{SIGINT, SIGTERM};
  MpiSession& m_mpi;
  bool m_slurm_time;
  const Options& m_opts;
  const int m_rank, m_size;
  MPI_Comm m_comm;
#if LHPC_TEST_HOOKS
  bool m_dies_late = false;  // LITHOPS_HPC_TEST_DIE_AT_START=R@started
#endif
  config::Placeholders m_ph;
  std::vector<std::string> m_nodes;
  int m_on_node = 0, m_index_on_node = 0;
  config::Config m_cfg;
  int m_slots = 1, m_required = 1;
  std::unique_ptr<health::Session> m_health;
  stage::Result m_staged;
  std::string m_image;
  std::unique_ptr<Worker> m_worker;
  std::string m_start_error;
  bool m_draining = false;
  bool m_all_ranks_failed = false;
  Clock::time_point m_next_report;
};

// Meet: every rank launched; one job id, node list and configuration.
void RankRun::meet(const config::Config& cfg_in) {
#if LHPC_TEST_HOOKS
  // integration/slurm-e2e: "R" makes rank R die right after MPI_Init, as one
  // that crashes during MPI start-up does; "R@started" once its worker
  // started, before the second meeting point.
  const char* die_hook = std::getenv("LITHOPS_HPC_TEST_DIE_AT_START");
  const bool dies_here = die_hook != nullptr && std::atoi(die_hook) == m_rank;
  m_dies_late = dies_here && std::strstr(die_hook, "@started") != nullptr;
  if (dies_here && !m_dies_late) {
    std::_Exit(1);  // exit-codes: a test hook's simulated crash
  }
#endif
  meet_or_abort(m_mpi, std::chrono::duration<double>(cfg_in.deploy.start_timeout), "launched");
  // One job id for every rank (rank 0's), so all name the same directories.
  m_ph = config::current_placeholders();
  if (m_ph.jobid == "local") {
    m_ph.jobid = "local-" + std::to_string(::getpid());
  }
  m_ph.jobid = allgather_strings(m_comm, m_ph.jobid)[0];
  m_nodes = allgather_strings(m_comm, m_ph.node);
  for (int r = 0; r < m_size; ++r) {
    if (m_nodes[static_cast<std::size_t>(r)] == m_ph.node) {
      m_index_on_node += r < m_rank ? 1 : 0;
      ++m_on_node;
    }
  }
  set_log_prefix("rank " + std::to_string(m_rank) + " " + m_ph.node);
  configure(cfg_in);
}

void RankRun::configure(const config::Config& cfg_in) {
  // Same file and environment on every rank: a config error fails every rank alike.
  m_cfg = config::expanded(apply_overrides(cfg_in, m_opts), m_ph);
  config::require_amqp_url(m_cfg);
  if (m_opts.sif.empty() && m_cfg.singularity.engine != config::Engine::host) {
    throw Error(Exit::usage,
                "deploy needs --sif PATH with the " +
                    std::string(config::k_engine_names.text(m_cfg.singularity.engine)) + " engine",
                "give the runtime image: lithops-hpc deploy --sif /scratch/rt.sif");
  }
  const auto& sing = m_cfg.singularity;
  const int node_slots = sing.worker_processes > 0 ? sing.worker_processes : worker::node_cores();
  m_slots = slots_for_rank(node_slots, m_on_node, m_index_on_node);
  if (sing.gpus_per_slot > 0 && sing.worker_processes == 0) {
    m_slots = 0;  // a GPU runtime: the worker takes this rank's share of the node's GPU slots
  }
  m_required = m_cfg.deploy.min_ranks > 0 ? std::min(m_cfg.deploy.min_ranks, m_size) : m_size;
  m_health = std::make_unique<health::Session>(m_comm, health::SessionOptions{.job = m_ph.jobid,
                                                                              .interval = m_cfg.health.interval,
                                                                              .status_file = m_cfg.health.status_file,
                                                                              .node = m_ph.node,
                                                                              .runtime = m_cfg.singularity.runtime,
                                                                              .keep_ended = m_cfg.health.keep_ended});
  if (m_rank == 0) {
    spdlog::info("deploying job {} on {} rank(s), {} node(s), runtime {}; status: {}", m_ph.jobid, m_size,
                 std::set<std::string>(m_nodes.begin(), m_nodes.end()).size(),
                 m_cfg.singularity.runtime.empty() ? "any (none set)" : m_cfg.singularity.runtime,
                 m_health->location().status);
  }
  report(health::State::staging, "");
}

// Stage: collective; every rank throws the same error.
void RankRun::stage() {
  m_image = m_opts.sif;
  if (m_opts.sif.empty()) {
    return;
  }
  try {
    m_staged = stage::stage_image(m_comm, {.source = m_opts.sif,
                                           .sif_dir = m_cfg.singularity.sif_path,
                                           .transfer = m_cfg.deploy.transfer,
                                           .chunk_bytes = static_cast<std::size_t>(m_cfg.deploy.chunk_mib) << 20,
                                           .compress = m_cfg.deploy.compress,
                                           .jobid = m_ph.jobid,
                                           .node_id = m_ph.node,
                                           .progress = m_rank == 0 && ::isatty(2),
                                           .stall_timeout = m_cfg.deploy.start_timeout,
                                           .tick = [this] { keep_reporting(health::State::staging); }});
    m_image = m_staged.local_path;
    // The image's GPU labels where no flag or key set them: the same bits on
    // every rank, so every rank decides (or throws) alike.
    config::apply_image_labels(m_cfg, m_image);
    if (m_cfg.singularity.gpus_per_slot > 0 && m_cfg.singularity.worker_processes == 0) {
      m_slots = 0;  // a GPU runtime: the worker takes this rank's share of the node's GPU slots
    }
  } catch (const Error&) {
    if (m_rank == 0) {
      m_health->set_state(health::DeploymentState::failed);
    }
    throw;
  }
}

// While the workers start (handlers importing Lithops: seconds, more on a
// loaded node or a cold shared filesystem) and wait for each other: every
// rank reports each interval and rank 0 keeps the table and the status file
// fresh, so `status` shows the ranks starting instead of calling a slow
// start a hung deployment (3 intervals without a write) and rank 0 does not
// mark the ranks unresponsive. Cheap: called every loop turn.
void RankRun::keep_reporting(health::State state) {
  if (m_rank == 0) {
    m_health->poll();  // takes in reports; rewrites the file when a state changed
  }
  if (Clock::now() >= m_next_report) {
    report(state, m_start_error);
  }
}

// Rank 0: where every rank's handler log is, for `lithops-hpc logs`.
void RankRun::record_logs() const {
  if (m_rank != 0) {
    return;
  }
  try {
    auto place =
        logs::record_place(m_cfg.logs.dir, m_ph.jobid, static_cast<std::uint64_t>(m_cfg.logs.max_bytes), m_nodes);
    spdlog::info("handler output of rank N: {}/rank-N.log{}; read it with: lithops-hpc logs {}", place.dir,
                 place.where == "node" ? " on its node" : "", m_ph.jobid);
  } catch (const Error& e) {
    spdlog::warn("lithops-hpc logs will not find this job's handler logs: {}", e.what());
  }
}

// Start: each rank its instance and worker, then one agreement.
void RankRun::start() {
  record_logs();
  m_worker = std::make_unique<Worker>(m_cfg, worker::WorkerIdentity{.rank = m_rank,
                                                                    .node = m_ph.node,
                                                                    .jobid = m_ph.jobid,
                                                                    .slots = m_slots,
                                                                    .ranks_on_node = m_on_node,
                                                                    .index_on_node = m_index_on_node});
  m_worker->set_signal_pipe(&m_signals);
  report(health::State::starting, "");
  m_start_error = start_worker();
  if (!m_start_error.empty()) {
    spdlog::error("failed to start: {}", m_start_error);
  }
#if LHPC_TEST_HOOKS
  if (m_dies_late) {
    std::_Exit(1);  // exit-codes: a test hook's simulated crash
  }
#endif
  agree_started();
}

// Starts the worker and waits until it runs or failed; returns why it failed.
std::string RankRun::start_worker() {
  auto& worker = *m_worker;
  try {
    worker.start(m_image);
    // Handlers and the broker come up asynchronously: a rank is started when
    // its worker runs, or has failed, before the ranks compare notes.
    const auto start_timeout = std::chrono::duration<double>(m_cfg.deploy.start_timeout);
    auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(start_timeout);
    while (worker.stats().state == worker::State::starting && !worker.finished() && Clock::now() < deadline &&
           SignalPipe::last_terminating() == 0) {
      worker.step(std::chrono::milliseconds(100));
      keep_reporting(health::State::starting);
    }
    auto st = worker.stats();
    if (worker.finished() || st.state == worker::State::failed) {
      return st.last_error.empty() ? "the worker stopped while starting" : st.last_error;
    }
    if (st.state == worker::State::starting && SignalPipe::last_terminating() == 0) {
      return fmt::format("the worker did not become ready within {:g} s (deploy.start_timeout)", start_timeout.count());
    }
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// What this rank undoes on its own when the job ends: its worker and
// instance, and (alone on its node) the staged image. Before any exchange
// with the others: if one is missing the job ends by MPI_Abort, which kills
// this rank before a collective cleanup could run. Ranks that share a node
// leave the image to the collective cleanup at the end.
void RankRun::teardown_alone() {
  m_worker->stop();
  if (m_cfg.deploy.cleanup && m_staged.leader && m_on_node == 1 && !m_staged.private_dir.empty()) {
    remove_tree(m_staged.private_dir);
  }
}

void RankRun::agree_started() {
  // Each rank's start above is bounded by start_timeout; the margin covers
  // ranks leaving the stage step at slightly different times.
  const double margin = std::min(60.0, m_cfg.deploy.start_timeout);
  // Still "starting" while waiting: the worker is not stepped here, so it does not serve yet.
  meet_or_abort(
      m_mpi, std::chrono::duration<double>(m_cfg.deploy.start_timeout + margin), "workers started",
      [this] { teardown_alone(); }, std::chrono::duration<double>(std::min(10.0, margin)),
      [this] { keep_reporting(m_start_error.empty() ? health::State::starting : health::State::failed); });
  auto verdict = agree(m_comm, m_start_error);
  if (m_rank == 0) {
    for (int r = 0; r < m_size; ++r) {
      if (!verdict.errors[static_cast<std::size_t>(r)].empty()) {
        spdlog::error("rank {} on {} failed to start: {}", r, m_nodes[static_cast<std::size_t>(r)],
                      verdict.errors[static_cast<std::size_t>(r)]);
      }
    }
  }
  if (verdict.ok_ranks < m_required) {
    m_worker->stop();
    if (m_rank == 0) {
      report(health::State::failed, m_start_error);
      m_health->set_state(health::DeploymentState::failed);
    }
    throw Error(Exit::engine,
                std::to_string(m_size - verdict.ok_ranks) + " of " + std::to_string(m_size) +
                    " rank(s) failed to start (rank 0's log names them)",
                m_required < m_size ? "deploy.min_ranks allows " + std::to_string(m_size - m_required) + " to fail"
                                    : "fix the cause, or let some ranks fail with deploy.min_ranks");
  }
  if (m_rank == 0) {
    spdlog::info("{} of {} rank(s) started; serving {}", verdict.ok_ranks, m_size,
                 config::redact_url(m_cfg.rabbitmq.amqp_url));
  }
}

// Starts the drain on this rank once, whatever asked for it. `tell_worker`
// is false for signals: the worker reads them from the signal pipe itself
// (and takes a second one as "stop now").
void RankRun::drain_all(const std::string& why, bool tell_worker) {
  if (m_draining) {
    return;
  }
  m_draining = true;
  spdlog::info("draining: {}", why);
  if (m_rank == 0) {
    m_health->set_state(health::DeploymentState::draining);
    m_health->broadcast(health::Command::drain);
  }
  if (tell_worker) {
    m_worker->request_drain();
  }
}

// Rank 0 decides for everyone: every rank failed, `stop`, the time limit.
void RankRun::decide_for_all(std::optional<slurm::TimeLeftWatch>& time_left) {
  if (m_rank != 0 || m_draining) {
    return;
  }
  if (all_failed(m_health->table())) {
    drain_all("every rank has failed");
    m_all_ranks_failed = true;
  } else if (m_health->stop_requested()) {
    drain_all("lithops-hpc stop");
  } else if (time_left) {
    if (auto left = time_left->current(); left && *left < m_cfg.deploy.drain_before_end) {
      drain_all("Slurm time limit in " + std::to_string(static_cast<int>(*left)) + " s");
    }
  }
}

// Serve: one loop per rank; MPI only non-blocking from here on. Returns
// true when the drain came because every rank's worker had failed for good.
bool RankRun::serve() {
  auto& worker = *m_worker;
  const bool started = m_start_error.empty();
  bool got_signal = false;
  std::optional<slurm::TimeLeftWatch> time_left;
  if (m_rank == 0 && m_slurm_time) {
    time_left.emplace(m_ph.jobid);
  }
  m_next_report = Clock::now();  // "ready" (or "failed") at once
  auto mono = [] { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); };
  health::Progress progress(m_rank == 0 ? m_cfg.logs.progress_interval : 0, mono(), m_cfg.singularity.runtime);
  while (true) {
    if (started && !worker.finished()) {
      worker.step(std::chrono::milliseconds(100));
    } else {
      idle_wait(m_signals, 100, got_signal);
    }
    if (got_signal || (SignalPipe::last_terminating() != 0 && !m_draining)) {
      drain_all(SignalPipe::last_terminating() == SIGINT ? "SIGINT" : "SIGTERM", false);
    }
    for (auto c : m_health->poll()) {
      if (c == health::Command::drain || c == health::Command::stop) {
        drain_all(std::string("rank 0 asked to ") + std::string(health::k_command_names.text(c)));
      }
    }
    decide_for_all(time_left);
    if (m_rank == 0 && !m_draining) {
      if (auto line = progress.due(m_health->table().summary(), mono())) {
        spdlog::info("{}", *line);
      }
    }
    if (Clock::now() >= m_next_report) {
      auto state = started ? state_of(worker.stats().state) : health::State::failed;
      if (state == health::State::stopped && !m_draining) {
        state = health::State::failed;
      }
      report(state, m_start_error);
    }
    // A finished worker waits for the drain, so the shutdown exchange starts
    // together on every rank; a failed one keeps reporting "failed" meanwhile.
    if (m_draining && (!started || worker.finished())) {
      return m_all_ranks_failed;
    }
  }
}

std::vector<health::GpuMemory> RankRun::gpu_memory(const WorkerStats& s) {
  if (s.gpus.empty() || m_cfg.singularity.gpu_vendor != config::GpuVendor::nvidia) {
    return {};
  }
  if (auto now = Clock::now(); now >= m_gpu_memory_at) {
    m_gpu_memory = gpu::query_nvidia_smi();
    m_gpu_memory_at = Clock::now() + k_gpu_memory_every;
  }
  std::vector<health::GpuMemory> out;
  for (const auto& m : gpu::memory_of(s.gpus, m_gpu_memory)) {
    out.push_back(m ? health::GpuMemory(std::make_pair(m->used_mib, m->total_mib)) : std::nullopt);
  }
  return out;
}

// Finish: the last report, the shutdown exchange, cleanup.
Exit RankRun::finish(bool all_ranks_failed) {
  teardown_alone();
  auto final_stats = m_worker->stats();
  auto final_report = make_report(health::State::stopped, final_stats, m_ph.node, m_start_error);
  // Long enough for the slowest healthy drain (and rank 0's own cleanup
  // between reports); only a rank that is really gone runs it out.
  auto ending = m_health->finish(final_report, m_cfg.deploy.drain_timeout + 3 * m_cfg.health.interval + 30);
  if (!ending.clean) {
    spdlog::error("shutdown incomplete: {}", ending.reason);
    if (m_staged.leader && m_cfg.deploy.cleanup && !m_staged.private_dir.empty()) {
      remove_tree(m_staged.private_dir);  // no collective: a rank is missing
    }
    m_mpi.abort(Exit::failure);
  }
  if (m_cfg.deploy.cleanup && !m_opts.sif.empty()) {
    stage::cleanup(m_comm, m_staged);
  }
  if (m_rank == 0) {
    spdlog::info("stopped: {} task(s) done, {} failed, {} requeued, {} dead-lettered on this rank",
                 final_stats.tasks_done, final_stats.tasks_failed, final_stats.tasks_requeued,
                 final_stats.dead_lettered);
  }
  // Ended by a drain (signal, stop, time limit): success; unless the drain
  // came because every rank's worker had failed for good.
  return all_ranks_failed ? Exit::engine : Exit::ok;
}

}  // namespace

Exit run(const config::Config& cfg_in, const Options& opts) {
  // Before MPI_Init: libslurm's first contact may take seconds, and its
  // answer decides whether rank 0 watches the time limit.
  bool slurm_time = slurm::in_allocation() && slurm::libslurm_available();
  MpiSession mpi(nullptr, nullptr);
  try {
    RankRun rank(mpi, slurm_time, opts);
    return rank.run(cfg_in);
  } catch (const Error& e) {
    log_collective_error(mpi.rank(), e);
    return e.code();
  }
}

}  // namespace lhpc::deploy
