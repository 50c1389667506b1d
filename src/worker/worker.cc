#include "worker/worker.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <regex>
#include <thread>

#include "amqp/connection.h"
#include "container/runscript.h"
#include "dispatch/dispatcher.h"
#include "dispatch/handler_pool.h"
#include "dispatch/protocol.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/signals.h"

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

namespace {

constexpr const char* k_handler_in_image = "/opt/lithops-hpc/handler.py";

std::string sanitize_name(std::string s) {
  for (auto& c : s) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-';
    if (!ok) {
      c = '_';
    }
  }
  return s;
}

std::int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

milliseconds until(Clock::time_point t, Clock::time_point now) {
  if (t <= now) {
    return milliseconds(0);
  }
  return std::chrono::duration_cast<milliseconds>(t - now) + milliseconds(1);
}

}  // namespace

// Dispatch-mode machinery, and the ports the dispatcher talks through.
struct Worker::Impl final : dispatch::BrokerPort, dispatch::HandlerPool::Listener {
  Worker& w;
  std::unique_ptr<amqp::Connection> conn;
  std::string consumer_tag;
  std::string broker_error;  // set by a port call that failed; handled after the batch
  amqp::Backoff backoff;
  Clock::time_point reconnect_at{};
  Clock::time_point last_pump{};
  bool connected_once = false;
  std::unique_ptr<dispatch::InflightRecord> inflight;
  std::unique_ptr<dispatch::Dispatcher> dispatcher;
  std::string rank_queue;  // ping reaches this rank through it
  std::unique_ptr<dispatch::HandlerPool> pool;
  std::unique_ptr<container::Runscript> runscript;
  bool runscript_signalled = false;
  bool check_instance_now = false;
  // LITHOPS_HPC_LATENCY_LOG (benchmarks): "sent_ns ack_ns" per acked message.
  std::string latency_path;
  std::vector<std::pair<std::int64_t, std::int64_t>> latencies;

  explicit Impl(Worker& worker) : w(worker) {}

  // --- BrokerPort: never throws -----------------------------------------
  template <class F>
  auto guarded(F&& f) -> decltype(f()) {
    using R = decltype(f());
    if (!conn || !broker_error.empty()) {
      return R();
    }
    try {
      return f();
    } catch (const Error& e) {
      broker_error = e.what();
      return R();
    }
  }
  void ack(std::uint64_t tag) override {
    guarded([&] { conn->ack(tag); });
  }
  void reject(std::uint64_t tag, bool requeue) override {
    guarded([&] { conn->reject(tag, requeue); });
  }
  std::uint64_t publish(const std::string& rk, const std::string& body, const amqp::Properties& p) override {
    return guarded([&] { return conn->publish("", rk, body, p); });
  }
  void set_prefetch(int n) override {
    guarded([&] { conn->qos_async(static_cast<std::uint16_t>(n), true); });
  }
  void stop_consuming() override {
    guarded([&] { conn->cancel_async(consumer_tag); });
  }

  // --- HandlerPool::Listener ---------------------------------------------
  void handler_ready(int h, const dispatch::Json&) override { dispatcher->on_handler_ready(h); }
  void handler_reply(int h, const dispatch::Json& reply) override { dispatcher->on_handler_reply(h, reply); }
  void handler_lost(int h, const std::string& why) override {
    check_instance_now = true;
    dispatcher->on_handler_lost(h, why);
  }
  void handler_failed_to_start(int) override { check_instance_now = true; }

  // Connecting blocks in rabbitmq-c (TCP, TLS, login, declarations: up to the
  // timeout each against a silent host), so it runs on a helper thread and
  // step() only looks at the result: the event loop, and the health reports
  // deploy sends from it, never stall on an unreachable broker. The thread
  // touches nothing but this shared state; a worker that stops first simply
  // drops its share.
  struct ConnectJob {
    std::mutex mu;
    bool done = false;
    std::unique_ptr<amqp::Connection> conn;
    std::string consumer_tag;
    std::string error;
  };
  std::shared_ptr<ConnectJob> connecting;
  int connecting_prefetch = 0;

  void start_connect() {
    amqp::Options o = amqp::options_from(w.m_cfg.rabbitmq);
    o.connection_name = "lithops-hpc worker rank " + std::to_string(w.m_id.rank) + " on " + w.m_id.node + " (job " +
                        w.m_id.jobid + ")";
    std::string q = w.m_cfg.rabbitmq.queue;
    std::string rq = rank_queue;
    int prefetch = dispatcher->desired_prefetch();
    auto job = std::make_shared<ConnectJob>();
    connecting = job;
    connecting_prefetch = prefetch;
    std::thread([job, o, q, rq, prefetch] {
      std::unique_ptr<amqp::Connection> c;
      std::string tag, error;
      try {
        c = std::make_unique<amqp::Connection>(o);
        // Exactly as the Lithops client declares it: durable, no arguments.
        c->declare_queue(q, true);
        c->declare_queue(q + ".dead", true);
        c->confirm_select();
        // Per channel (global): the one limit RabbitMQ lets us change while consuming.
        c->qos(static_cast<std::uint16_t>(prefetch), true);
        tag = c->consume(q);
        // Gone with its last consumer; no acks. Not exclusive: standalone
        // workers of one job all are its rank 0. RabbitMQ counts these
        // deliveries against this channel's (global) prefetch too, so a rank
        // with every slot busy answers when one frees: a channel of its own
        // would lift that.
        c->declare_queue(rq, false, /*exclusive=*/false, /*auto_delete=*/true);
        c->consume(rq, /*no_ack=*/true);
      } catch (const std::exception& e) {
        c.reset();
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(job->mu);
      job->conn = std::move(c);
      job->consumer_tag = std::move(tag);
      job->error = std::move(error);
      job->done = true;
    }).detach();
  }

  // Takes over a finished connection attempt; false while it still runs.
  bool finish_connect() {
    std::unique_ptr<amqp::Connection> c;
    std::string tag, error;
    {
      std::lock_guard<std::mutex> lock(connecting->mu);
      if (!connecting->done) {
        return false;
      }
      c = std::move(connecting->conn);
      tag = std::move(connecting->consumer_tag);
      error = std::move(connecting->error);
    }
    connecting.reset();
    if (!c) {
      auto delay = backoff.next();
      reconnect_at = Clock::now() + delay;
      w.m_last_error = error;
      spdlog::warn("{}; retrying in {:.1f} s", error, delay.count() / 1000.0);
      return true;
    }
    if (w.m_state != State::running) {
      return true;  // draining or failed meanwhile: close it again (nothing was delivered to us yet)
    }
    conn = std::move(c);
    consumer_tag = std::move(tag);
    broker_error.clear();
    last_pump = Clock::now();
    dispatcher->on_connected(connecting_prefetch);
    backoff.reset();
    spdlog::info("{} {} on {} with {} slots (prefetch {})", connected_once ? "reconnected: consuming" : "consuming",
                 w.m_cfg.rabbitmq.queue, conn->redacted_url(), w.m_slots, connecting_prefetch);
    connected_once = true;
    return true;
  }

  void lost(std::string why) {  // by value: callers pass broker_error, cleared here
    conn.reset();  // broken: no polite close; the broker requeues what we held
    consumer_tag.clear();
    broker_error.clear();
    dispatcher->on_disconnected();
    w.m_last_error = why;
    if (w.m_state == State::draining) {
      spdlog::warn("lost the broker while draining: {}", why);
      return;
    }
    auto delay = backoff.next();
    reconnect_at = Clock::now() + delay;
    spdlog::warn("lost the broker: {}; reconnecting in {:.1f} s", why, delay.count() / 1000.0);
  }

  void pump(bool readable) {
    if (!conn || !broker_error.empty()) {
      return;  // a port call already found it broken: lost() follows
    }
    try {
      conn->pump(readable);
      last_pump = Clock::now();
      amqp::Delivery d;
      while (broker_error.empty() && conn && conn->next_delivery(d)) {
        dispatcher->on_delivery(std::move(d));
      }
      if (conn) {
        for (const auto& c : conn->take_confirms()) {
          dispatcher->on_confirm(c);
        }
      }
      if (conn && conn->consumer_cancelled() && w.m_state == State::running) {
        throw Error(Exit::broker, "the broker cancelled our consumer (was " + w.m_cfg.rabbitmq.queue + " deleted?)");
      }
    } catch (const Error& e) {
      broker_error = e.what();
    }
  }

  void on_ack(const amqp::Delivery& d) {
    auto sent = amqp::table_int(d.props.headers, dispatch::k_hdr_sent_ns, 0);
    if (sent > 0) {
      latencies.emplace_back(sent, wall_ns());
    }
  }

  // Written in batches (every 200 ms at most) so a benchmark can watch the
  // file grow without the worker paying a write per message.
  void write_latencies() {
    if (latency_path.empty() || latencies.empty()) {
      return;
    }
    std::ofstream out(latency_path, std::ios::app);
    for (const auto& [s, a] : latencies) {
      out << s << ' ' << a << '\n';
    }
    latencies.clear();
    last_latency_write = Clock::now();
  }
  Clock::time_point last_latency_write{};
};

Worker::Worker(const config::Config& cfg, WorkerIdentity id, std::unique_ptr<container::Engine> engine)
    : m_cfg(cfg), m_id(std::move(id)), m_engine(std::move(engine)), m_impl(std::make_unique<Impl>(*this)) {
  auto ph = config::current_placeholders();
  if (m_id.node.empty()) {
    m_id.node = ph.node;
  }
  if (m_id.jobid.empty()) {
    m_id.jobid = ph.jobid;
  }
  m_slots = m_id.slots > 0 ? m_id.slots
                           : (m_cfg.singularity.worker_processes > 0 ? m_cfg.singularity.worker_processes : node_cores());
  if (!m_engine) {
    m_engine = container::make_engine(m_cfg.singularity.engine);
  }
  m_instance = sanitize_name(m_cfg.singularity.instance_name + "-" + m_id.jobid + "-" + std::to_string(m_id.rank));
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

void Worker::start(const std::string& image) {
  if (m_state != State::created) {
    throw Error(Exit::failure, "worker started twice");
  }
  // A handler that dies while we write to it must not kill us with SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  m_state = State::starting;
  bool dispatch_mode = m_cfg.deploy.mode == config::Mode::dispatch;
  config::require_amqp_url(m_cfg);

  // The handler: ours from the install or source tree, bind-mounted over the
  // image's copy so both sides speak the same protocol version.
  std::string handler_host;
  try {
    handler_host = container::find_runtime_defs_dir() + "/handler.py";
    if (!path_exists(handler_host)) {
      handler_host.clear();
    }
  } catch (const Error&) {
    handler_host.clear();
  }
  bool host = m_engine->kind() == config::Engine::host;
  if (dispatch_mode && host && handler_host.empty()) {
    throw Error(Exit::failure, "cannot find runtime-defs/handler.py for the host engine",
                "install lithops-hpc (make install) or run it from its build tree");
  }

  container::InstanceSpec spec;
  spec.image = image;
  spec.name = m_instance;
  spec.fakeroot = m_cfg.singularity.fakeroot;
  spec.nv = m_cfg.singularity.nv;
  spec.binds = m_cfg.singularity.binds;
  if (dispatch_mode && !host && !handler_host.empty()) {
    container::check_bind_path(handler_host, "the handler bind (lithops-hpc's installed runtime-defs/handler.py)");
    spec.binds.push_back(handler_host + ":" + k_handler_in_image + ":ro");
  }
  spdlog::info("starting {} instance {} ({} mode, {} slots){}", m_engine->name(), m_instance,
               config::to_string(m_cfg.deploy.mode), m_slots, host ? "" : " from " + image);
  m_spec = spec;
  m_engine->start_instance(spec);
  m_instance_started = true;
  m_instance_alive = true;
  m_next_instance_check = Clock::now() + std::chrono::seconds(30);

  if (!dispatch_mode) {
    container::RunscriptOptions ro;
    ro.restart_limit = m_cfg.deploy.restart_limit;
    m_impl->runscript = std::make_unique<container::Runscript>(
        *m_engine, m_instance, std::map<std::string, std::string>{{"AMQP_URL", m_cfg.rabbitmq.amqp_url}}, ro);
    m_impl->runscript->start();
    m_state = State::running;
    return;
  }

  // Dispatch mode.
  if (const char* p = std::getenv("LITHOPS_HPC_LATENCY_LOG"); p && *p) {
    m_impl->latency_path = p;
  }
  dispatch::DispatcherOptions dopts;
  dopts.slots = m_slots;
  dopts.queue = m_cfg.rabbitmq.queue;
  dopts.rank = m_id.rank;
  dopts.node = m_id.node;
  dopts.limits = {static_cast<std::size_t>(m_cfg.rabbitmq.max_message_bytes), m_cfg.rabbitmq.max_message_depth};
  dopts.rank_queue = dispatch::rank_queue(m_cfg.rabbitmq.queue, m_id.jobid, m_id.rank);
  m_impl->rank_queue = dopts.rank_queue;
  m_impl->inflight = std::make_unique<dispatch::InflightRecord>(
      state_dir() + "/inflight/" + sanitize_name(m_id.node),
      sanitize_name(m_id.jobid) + "-" + std::to_string(m_id.rank) + "-" + std::to_string(::getpid()));
  std::string handler_path = host ? handler_host : std::string(k_handler_in_image);
  auto command = [this, handler_path](int h) {
    dispatch::HandlerCommand c;
    c.argv = m_engine->exec_argv(m_instance, {m_cfg.singularity.python, handler_path});
    // Handlers never talk to the broker: the URL stays out of their environment.
    Env base = Env::current();
    for (const char* k : {"AMQP_URL", "SINGULARITYENV_AMQP_URL", "APPTAINERENV_AMQP_URL"}) {
      base.unset(k);
    }
    c.env = m_engine->child_env(base, {{"LITHOPS_HPC_RANK", std::to_string(m_id.rank)},
                                       {"LITHOPS_HPC_HANDLER", h == m_slots ? "control" : std::to_string(h)}});
    return c;
  };
  dispatch::PoolOptions popts;
  popts.restart_limit = m_cfg.deploy.restart_limit;
  m_impl->pool = std::make_unique<dispatch::HandlerPool>(m_slots + 1, command, popts, *m_impl);
  // The dispatcher sends through the pool.
  m_impl->dispatcher = std::make_unique<dispatch::Dispatcher>(dopts, *m_impl, *m_impl->pool, m_impl->inflight.get());
  m_impl->dispatcher->set_on_ack([this](const amqp::Delivery& d) { m_impl->on_ack(d); });
  m_impl->pool->start();
  m_state = State::running;
}

void Worker::request_drain() {
  if (m_state != State::running && m_state != State::starting) {
    return;
  }
  m_state = State::draining;
  m_drain_deadline = Clock::now() + milliseconds(static_cast<long long>(m_cfg.deploy.drain_timeout * 1000));
  if (m_impl->dispatcher) {
    spdlog::info("draining: no new tasks; {} running get {:.0f} s to finish", m_impl->dispatcher->busy_slots(),
                 m_cfg.deploy.drain_timeout);
    m_impl->dispatcher->drain();
  } else {
    spdlog::info("draining: stopping the runscript");
  }
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
      spdlog::warn("second {}: stopping now; unfinished tasks go back to the queue", sig == SIGINT ? "SIGINT" : "SIGTERM");
      m_drain_deadline = Clock::now();
    } else {
      spdlog::info("{} received", sig == SIGINT ? "SIGINT" : "SIGTERM");
      request_drain();
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
    if (m_impl->runscript) {
      step_runscript(max_wait);
    } else {
      step_dispatch(max_wait);
    }
  } catch (const Error& e) {
    fail(e.what());
  } catch (const std::exception& e) {
    // A bug, not a situation: still give the work back and stop cleanly.
    fail(std::string("internal error: ") + e.what());
  }
}

void Worker::step_dispatch(milliseconds max_wait) {
  auto& im = *m_impl;
  auto now = Clock::now();
  std::vector<pollfd> fds;
  std::vector<int> tags;  // -1 signals, -2 broker, -3-i watched, >= 0 pool
  if (m_signals) {
    fds.push_back({m_signals->fd(), POLLIN, 0});
    tags.push_back(-1);
  }
  for (std::size_t i = 0; i < m_watched.size(); ++i) {
    fds.push_back({m_watched[i].first, POLLIN, 0});
    tags.push_back(-3 - static_cast<int>(i));
  }
  if (im.conn) {
    fds.push_back({im.conn->fd(), POLLIN, 0});
    tags.push_back(-2);
  }
  im.pool->add_pollfds(fds, tags);

  milliseconds timeout = max_wait;
  auto sooner = [&](Clock::time_point t) { timeout = std::min(timeout, until(t, now)); };
  if (im.conn) {
    if (im.conn->buffered()) {
      timeout = milliseconds(0);
    }
    // rabbitmq-c sends heartbeats only while it reads.
    sooner(im.last_pump + milliseconds(std::max(1, m_cfg.rabbitmq.heartbeat) * 250));
  } else if (im.connecting) {
    sooner(now + milliseconds(20));  // the helper thread's result
  } else if (m_state == State::running && im.pool->ready_count() > 0) {
    sooner(im.reconnect_at);
  }
  if (auto t = im.pool->next_deadline()) {
    sooner(*t);
  }
  if (m_state == State::draining) {
    sooner(m_drain_deadline);
  }
  int n = ::poll(fds.data(), fds.size(), static_cast<int>(timeout.count()));
  if (n < 0 && errno != EINTR) {
    throw Error(Exit::failure, std::string("poll failed: ") + errno_text(errno));
  }
  bool broker_readable = false;
  for (std::size_t i = 0; n > 0 && i < fds.size(); ++i) {
    if (!fds[i].revents) {
      continue;
    }
    int tag = tags[i];
    if (tag == -1) {
      on_signals();
    } else if (tag == -2) {
      broker_readable = true;
    } else if (tag <= -3) {
      m_watched[static_cast<std::size_t>(-3 - tag)].second();
    } else {
      im.pool->handle(tag, fds[i].revents);
    }
  }
  now = Clock::now();
  if (im.conn && (broker_readable || im.conn->buffered() ||
                  now - im.last_pump >= milliseconds(std::max(1, m_cfg.rabbitmq.heartbeat) * 250))) {
    im.pump(broker_readable);
  }
  im.pool->tick(now);
  if (!im.broker_error.empty()) {
    im.lost(im.broker_error);
  }
  if (im.pool->failed()) {
    throw Error(Exit::engine, "handlers cannot start: " + im.pool->last_error(),
                "check singularity.python and that Lithops imports in the image (the handler's stderr is above)");
  }
  if (im.check_instance_now || now >= m_next_instance_check) {
    check_instance(now);
  }
  // Connect once a slot handler is ready: a node whose handlers cannot start
  // never takes messages from healthy ones.
  if (im.connecting) {
    im.finish_connect();
  } else if (!im.conn && m_state == State::running && im.pool->ready_count() > 0 && now >= im.reconnect_at) {
    im.start_connect();
  }
  if (!im.latencies.empty() && now - im.last_latency_write > milliseconds(200)) {
    im.write_latencies();
  }
  if (m_state == State::draining) {
    if (im.dispatcher->idle()) {
      spdlog::info("drained: every running task finished");
      finish();
    } else if (now >= m_drain_deadline) {
      spdlog::warn("drain timeout: {} calls still running are given back to the queue", im.dispatcher->busy_slots());
      im.dispatcher->abort();
      if (!im.broker_error.empty()) {
        im.lost(im.broker_error);
      }
      // Given back: stop them now rather than run beside their redelivery.
      finish(milliseconds(0));
    }
  }
}

void Worker::step_runscript(milliseconds max_wait) {
  auto& rs = *m_impl->runscript;
  auto now = Clock::now();
  std::vector<pollfd> fds;
  if (m_signals) {
    fds.push_back({m_signals->fd(), POLLIN, 0});
  }
  for (const auto& w : m_watched) {
    fds.push_back({w.first, POLLIN, 0});
  }
  // No SIGCHLD here: check the run at least every 200 ms.
  milliseconds timeout = std::min(max_wait, milliseconds(200));
  if (auto t = rs.next_wakeup()) {
    timeout = std::min(timeout, until(*t, now));
  }
  int n = ::poll(fds.data(), fds.size(), static_cast<int>(timeout.count()));
  std::size_t i = 0;
  if (m_signals) {
    if (n > 0 && fds[0].revents) {
      on_signals();
    }
    ++i;
  }
  for (std::size_t k = 0; n > 0 && k < m_watched.size(); ++k, ++i) {
    if (fds[i].revents) {
      m_watched[k].second();
    }
  }
  now = Clock::now();
  if (m_state == State::draining) {
    // Non-blocking: SIGTERM once, then watch it go; SIGKILL at the deadline.
    if (!m_impl->runscript_signalled && rs.alive()) {
      ::kill(-rs.pid(), SIGTERM);
      m_impl->runscript_signalled = true;
    }
    rs.poll(now);  // reaps; a restart is never due this soon (backoff >= 1 s)
    if (!rs.alive() || now >= m_drain_deadline) {
      rs.stop(milliseconds(0));
      spdlog::info("runscript stopped");
      finish();
    }
    return;
  }
  rs.poll(now);
  if (rs.failed()) {
    throw Error(Exit::engine, "the runscript keeps failing: " + rs.last_error());
  }
  if (now >= m_next_instance_check) {
    check_instance(now);
  }
}

void Worker::check_instance(Clock::time_point now) {
  m_impl->check_instance_now = false;
  m_next_instance_check = now + std::chrono::seconds(30);
  if (!m_instance_started) {
    return;
  }
  m_instance_alive = m_engine->instance_alive(m_instance);
  if (m_instance_alive) {
    return;
  }
  ++m_instance_restarts;
  if (m_instance_restarts > m_cfg.deploy.restart_limit) {
    throw Error(Exit::engine, "instance " + m_instance + " died " + std::to_string(m_instance_restarts) + " times");
  }
  spdlog::error("instance {} is gone: restarting it ({} of {})", m_instance, m_instance_restarts,
                m_cfg.deploy.restart_limit);
  // A dead instance may still be listed for a moment: stop it for good first.
  try {
    m_engine->stop_instance(m_instance, milliseconds(5000));
  } catch (const Error& e) {
    spdlog::debug("stopping the dead instance: {}", e.what());
  }
  m_engine->start_instance(m_spec);
  m_instance_alive = true;
}

void Worker::fail(const std::string& why) {
  if (finished()) {
    return;
  }
  m_last_error = why;
  spdlog::error("worker failed: {}", why);
  if (m_impl->dispatcher) {
    // Stop consuming so healthy nodes take the work; give back what we hold.
    m_impl->dispatcher->drain();
    m_impl->dispatcher->abort();
  }
  finish(milliseconds(0));
  m_state = State::failed;
}

void Worker::finish(milliseconds handler_grace) {
  auto& im = *m_impl;
  im.write_latencies();
  im.conn.reset();  // polite close: anything still unacked goes back to the queue
  if (im.pool) {
    // Idle handlers exit at once on EOF; busy ones only after an abort.
    im.pool->stop(handler_grace);
  }
  if (im.runscript) {
    im.runscript->stop(milliseconds(5000));
  }
  stop();
  m_state = State::stopped;
}

void Worker::stop() {
  if (m_impl) {
    m_impl->conn.reset();
    if (m_impl->pool) {
      m_impl->pool->stop(milliseconds(2000));
    }
  }
  if (m_instance_started) {
    m_instance_started = false;
    m_instance_alive = false;
    spdlog::info("stopping instance {}", m_instance);
    m_engine->stop_instance(m_instance, milliseconds(10000));
  }
}

WorkerStats Worker::stats() const {
  WorkerStats s;
  switch (m_state) {
    case State::created:
    case State::starting: s.state = "starting"; break;
    case State::running: s.state = "running"; break;
    case State::draining: s.state = "draining"; break;
    case State::stopped: s.state = "stopped"; break;
    case State::failed: s.state = "failed"; break;
  }
  s.slots_total = m_slots;
  s.instance_alive = m_instance_started && m_instance_alive;
  s.restarts = m_instance_restarts;
  s.last_error = m_last_error;
  const auto& im = *m_impl;
  if (im.dispatcher) {
    const auto& c = im.dispatcher->counters();
    s.slots_busy = im.dispatcher->busy_slots();
    s.tasks_done = c.tasks_done;
    s.tasks_failed = c.tasks_failed;
    s.tasks_requeued = c.tasks_requeued;
    s.dead_lettered = c.dead_lettered;
    s.broker_connected = im.conn != nullptr;
    if (m_state == State::running && im.pool && im.pool->ready_count() == 0) {
      s.state = "starting";
    }
  }
  if (im.pool) {
    s.restarts += im.pool->restarts();
  }
  if (im.runscript) {
    s.restarts += im.runscript->restarts();
    s.broker_connected = im.runscript->alive();
    s.slots_busy = 0;
  }
  return s;
}

}  // namespace lhpc::worker
