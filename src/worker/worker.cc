#include "worker/worker.h"

#include <sched.h>
#include <signal.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <thread>

#include "gpu/slots.h"
#include "logs/capture.h"
#include "logs/place.h"
#include "util/error.h"
#include "util/signals.h"
#include "worker/dispatch_mode.h"
#include "worker/instance.h"
#include "worker/mode.h"
#include "worker/runscript_mode.h"

namespace lhpc::worker {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int node_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) {
      return n;
    }
  }
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

std::string sanitize_name(std::string s) {
  for (auto& c : s) {
    bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) {
      c = '_';
    }
  }
  return s;
}

Worker::Worker(const config::Config& cfg, WorkerIdentity id, WorkerPorts ports)
    : m_cfg(cfg),
      m_id(std::move(id)),
      m_engine(std::move(ports.engine)),
      m_gpu_env(std::move(ports.gpu_env)),
      m_gpu_root(std::move(ports.gpu_root)) {
  auto ph = config::current_placeholders();
  if (m_id.node.empty()) {
    m_id.node = ph.node;
  }
  if (m_id.jobid.empty()) {
    m_id.jobid = ph.jobid;
  }
  m_slots = m_id.slots > 0
                ? m_id.slots
                : (m_cfg.singularity.worker_processes > 0 ? m_cfg.singularity.worker_processes : node_cores());
  if (!m_engine) {
    m_engine = container::make_engine(m_cfg.singularity.engine);
  }
  m_instance = sanitize_name(m_cfg.singularity.instance_name + "-" + m_id.jobid + "-" + std::to_string(m_id.rank));
  m_supervisor = ports.instance_backoff ? std::make_unique<InstanceSupervisor>(*m_engine, m_cfg.deploy.restart_limit,
                                                                               *ports.instance_backoff)
                                        : std::make_unique<InstanceSupervisor>(*m_engine, m_cfg.deploy.restart_limit);
  m_context = std::make_unique<ModeContext>(ModeContext{
      .cfg = m_cfg,
      .id = m_id,
      .slots = m_slots,
      .engine = *m_engine,
      .instance_name = m_instance,
      .instance = *m_supervisor,
      .log = nullptr,
      .state = [this] { return m_state; },
      .drain_deadline = [this] { return m_drain_deadline; },
      .poll = [this](std::vector<pollfd>& fds, milliseconds timeout) { poll_round(fds, timeout); },
      .note_error = [this](const std::string& why) { m_last_error = why; },
  });
  m_mode = make_mode(std::move(ports.broker));
}

// The one place that knows which modes there are.
std::unique_ptr<Mode> Worker::make_mode(std::unique_ptr<BrokerConnector> broker) {
  switch (m_cfg.deploy.mode) {
    case config::Mode::dispatch: return std::make_unique<DispatchMode>(*m_context, std::move(broker));
    case config::Mode::runscript: return std::make_unique<RunscriptMode>(*m_context);
  }
  throw Error(Exit::failure, "unknown deploy.mode");
}

Worker::~Worker() {
  try {
    stop();
  } catch (const std::exception& e) {
    spdlog::error("stopping the worker: {}", e.what());
  }
}

void Worker::set_signal_pipe(SignalPipe* signals) { m_signals = signals; }

void Worker::watch_fd(int fd, std::function<void()> on_ready) { m_watched.emplace_back(fd, std::move(on_ready)); }

container::InstanceSpec Worker::instance_spec(const std::string& image) const {
  container::InstanceSpec spec;
  spec.image = image;
  spec.name = m_instance;
  spec.fakeroot = m_cfg.singularity.fakeroot;
  if (m_cfg.singularity.gpus_per_slot > 0) {
    spec.gpu = gpu::engine_flags(m_cfg.singularity.gpu_vendor, m_cfg.singularity.nvccli);
  } else if (m_cfg.singularity.nv) {
    spec.gpu = gpu::engine_flags(config::GpuVendor::nvidia, m_cfg.singularity.nvccli);
  }
  spec.binds = m_cfg.singularity.binds;
  return spec;
}

void Worker::start(const std::string& image) {
  if (m_state != State::created) {
    throw Error(Exit::failure, "worker started twice");
  }
  m_state = State::starting;
  try {
    start_parts(image);
  } catch (const std::exception& e) {
    // Never stepped half-started; stop() ends what did start. The error
    // itself goes to the caller unchanged.
    m_last_error = e.what();
    m_state = State::failed;
    throw;
  }
  m_state = State::running;
}

void Worker::start_parts(const std::string& image) {
  config::require_amqp_url(m_cfg);
  bool host = m_engine->kind() == config::Engine::host;
  plan_gpu_slots();
  auto spec = instance_spec(image);
  m_mode->prepare(spec);
  spdlog::info("starting {} instance {} ({} mode, {} slots){}", m_engine->name(), m_instance,
               config::k_mode_names.text(m_cfg.deploy.mode), m_slots, host ? "" : " from " + image);
  m_supervisor->start(spec);
  open_handler_log();
  m_context->log = m_log.get();
  m_mode->start();
}

// A GPU runtime's slots are the whole groups of GPUs this rank's share of
// the node holds, not its cores; an explicit slot count may lower it. Too few
// GPUs fail the start here, not the first call.
void Worker::plan_gpu_slots() {
  const auto& s = m_cfg.singularity;
  if (s.gpus_per_slot <= 0) {
    return;
  }
  if (m_cfg.deploy.mode == config::Mode::runscript) {
    throw Error(Exit::config,
                "a GPU runtime (gpus_per_slot " + std::to_string(s.gpus_per_slot) +
                    ") needs deploy.mode = \"dispatch\": the image's runscript runs its calls in processes of its "
                    "own, so lithops-hpc cannot give each call its own GPU",
                "use the dispatch mode (the default), or leave gpus_per_slot unset and give the runscript every GPU "
                "of the job with singularity.nv = true");
  }
  auto devices = gpu::discover(m_gpu_env ? *m_gpu_env : Env::current(), s.gpu_vendor, m_gpu_root);
  auto groups =
      gpu::share_of(gpu::split_slots(devices, s.gpus_per_slot, s.gpu_vendor), m_id.ranks_on_node, m_id.index_on_node);
  const int limit = m_id.slots > 0 ? m_id.slots : s.worker_processes;
  if (limit > 0 && static_cast<std::size_t>(limit) < groups.size()) {
    groups.resize(static_cast<std::size_t>(limit));
  }
  m_gpus = groups;
  m_slots = static_cast<int>(groups.size());
  m_context->slots = m_slots;
  m_context->slot_env.clear();
  for (const auto& g : groups) {
    m_context->slot_env.push_back(gpu::slot_env(s.gpu_vendor, g));
  }
  spdlog::info("GPU runtime: {} {} GPU(s) from {}, {} slot(s) of {}", devices.ids.size(),
               config::k_gpu_vendor_names.text(s.gpu_vendor), devices.source, m_slots, s.gpus_per_slot);
}

// Handler output to the rank's log file. A directory that is not ours (a
// symlink or a directory planted by another user in /tmp) must not stop the
// worker: its output then stays in ours, and the warning says why.
void Worker::open_handler_log() {
  try {
    auto place = logs::place_for(m_cfg.logs.dir, m_id.jobid);
    auto name = logs::file_name(m_id.rank);
    m_log = std::make_unique<logs::Capture>(logs::open_dir(place, true), name, place.dir + "/" + name,
                                            static_cast<std::uint64_t>(m_cfg.logs.max_bytes));
    spdlog::debug("handler output: {}", m_log->path());
  } catch (const Error& e) {
    spdlog::warn("handler output stays in this output: {}{}", e.what(), e.hint().empty() ? "" : " (" + e.hint() + ")");
  }
}

void Worker::request_drain() {
  if (m_state != State::running && m_state != State::starting) {
    return;
  }
  m_state = State::draining;
  m_drain_deadline = Clock::now() + milliseconds(static_cast<long long>(m_cfg.deploy.drain_timeout * 1000));
  m_mode->drain();
}

bool Worker::finished() const { return m_state == State::stopped || m_state == State::failed; }

void Worker::on_signals() {
  if (!m_signals) {
    return;
  }
  for (int sig : m_signals->drain()) {
    if (sig != SIGINT && sig != SIGTERM) {
      continue;
    }
    if (m_state == State::draining) {
      spdlog::warn("second {}: stopping now; unfinished tasks go back to the queue",
                   sig == SIGINT ? "SIGINT" : "SIGTERM");
      m_drain_deadline = Clock::now();
    } else {
      spdlog::info("{} received", sig == SIGINT ? "SIGINT" : "SIGTERM");
      request_drain();
    }
  }
}

void Worker::poll_round(std::vector<pollfd>& fds, milliseconds timeout) {
  std::vector<pollfd> all;
  if (m_signals) {
    all.push_back({m_signals->fd(), POLLIN, 0});
  }
  for (const auto& w : m_watched) {
    all.push_back({w.first, POLLIN, 0});
  }
  const std::size_t own = all.size();
  all.insert(all.end(), fds.begin(), fds.end());
  int n = ::poll(all.data(), all.size(), static_cast<int>(std::max<long long>(timeout.count(), 0)));
  if (n < 0 && errno != EINTR) {
    throw Error(Exit::failure, std::string("poll failed: ") + errno_text(errno));
  }
  for (std::size_t i = 0; i < fds.size(); ++i) {
    fds[i].revents = n > 0 ? all[own + i].revents : 0;
  }
  if (n <= 0) {
    return;
  }
  std::size_t i = 0;
  if (m_signals && all[i++].revents) {
    on_signals();
  }
  for (std::size_t k = 0; k < m_watched.size(); ++k, ++i) {
    if (all[i].revents) {
      m_watched[k].second();
    }
  }
}

void Worker::step(milliseconds max_wait) {
  if (finished() || m_state == State::created) {
    if (max_wait.count() > 0 && m_state == State::created) {
      std::this_thread::sleep_for(max_wait);
    }
    return;
  }
  try {
    if (auto done = m_mode->step(max_wait)) {
      finish(done->grace);
    }
  } catch (const Error& e) {
    fail(e.what(), e.hint());
  } catch (const std::exception& e) {
    // A bug, not a situation: still give the work back and stop cleanly.
    fail(std::string("internal error: ") + e.what());
  }
}

void Worker::fail(const std::string& why, const std::string& hint) {
  if (finished()) {
    return;
  }
  m_last_error = why;
  spdlog::error("worker failed: {}", why);
  if (!hint.empty()) {
    spdlog::error("hint: {}", hint);
  }
  m_mode->abort();  // stop taking work so healthy nodes take it; give back what we hold
  finish(milliseconds(0));
  m_state = State::failed;
}

void Worker::finish(milliseconds handler_grace) {
  m_mode->finish(handler_grace);
  stop();
  m_state = State::stopped;
}

void Worker::stop() {
  m_mode->stop();
  if (m_supervisor) {
    m_supervisor->stop();
  }
  if (m_log) {
    m_log->close();  // the handlers are gone: what they wrote is in the file
  }
}

WorkerStats Worker::stats() const {
  WorkerStats s;
  s.state = m_state == State::created ? State::starting : m_state;
  s.slots_total = m_slots;
  s.instance_alive = m_supervisor->alive();
  s.restarts = m_supervisor->restarts();
  s.last_error = m_last_error;
  s.gpus = m_gpus;
  m_mode->fill(s);
  return s;
}

}  // namespace lhpc::worker
