#include "worker/dispatch_mode.h"

#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <utility>

#include "container/engine.h"
#include "dispatch/inflight.h"
#include "dispatch/protocol.h"
#include "dispatch/runtime.h"
#include "lhpc_build_config.h"
#include "logs/capture.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/memory_limit.h"
#include "worker/instance.h"

namespace lhpc::worker {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

milliseconds until(Clock::time_point t, Clock::time_point now) {
  if (t <= now) {
    return milliseconds(0);
  }
  return std::chrono::duration_cast<milliseconds>(t - now) + milliseconds(1);
}

}  // namespace

#if LHPC_TEST_HOOKS
// Benchmarks only (LITHOPS_HPC_LATENCY_LOG, test builds): "sent_ns ack_ns"
// per acked message, written in batches (every 200 ms at most) so a benchmark
// can watch the file grow without the worker paying a write per message.
class LatencyLog {
public:
  explicit LatencyLog(std::string path) : m_path(std::move(path)) {}
  void on_ack(const amqp::Delivery& d) {
    auto sent = amqp::table_int(d.props.headers, dispatch::k_hdr_sent_ns, 0);
    if (sent > 0) {
      auto now = std::chrono::system_clock::now().time_since_epoch();
      m_rows.emplace_back(sent, std::chrono::duration_cast<std::chrono::nanoseconds>(now).count());
    }
  }
  void maybe_write(Clock::time_point now) {
    if (!m_rows.empty() && now - m_last_write > milliseconds(200)) {
      write();
    }
  }
  void write() {
    if (m_rows.empty()) {
      return;
    }
    std::ofstream out(m_path, std::ios::app);
    for (const auto& [s, a] : m_rows) {
      out << s << ' ' << a << '\n';
    }
    m_rows.clear();
    m_last_write = Clock::now();
  }

private:
  std::string m_path;
  std::vector<std::pair<std::int64_t, std::int64_t>> m_rows;
  Clock::time_point m_last_write{};
};
#endif

std::string DispatchMode::find_handler(bool host_engine) {
  std::string path;
  try {
    path = container::find_runtime_defs_dir() + "/handler.py";
    if (!path_exists(path)) {
      path.clear();
    }
  } catch (const Error&) {
    path.clear();
  }
  if (host_engine && path.empty()) {
    throw Error(Exit::failure, "cannot find runtime-defs/handler.py for the host engine",
                "install lithops-hpc (make install) or run it from its build tree");
  }
  return path;
}

namespace {

amqp::Options broker_options(const config::Config& cfg, const WorkerIdentity& id) {
  amqp::Options o = amqp::options_from(cfg.rabbitmq);
  o.connection_name =
      "lithops-hpc worker rank " + std::to_string(id.rank) + " on " + id.node + " (job " + id.jobid + ")";
  return o;
}

}  // namespace

DispatchMode::DispatchMode(const ModeContext& ctx, std::unique_ptr<BrokerConnector> broker)
    : m_ctx(ctx), m_reconnect(broker ? std::move(broker) : make_amqp_connector(broker_options(ctx.cfg, ctx.id))) {}

DispatchMode::~DispatchMode() = default;

void DispatchMode::prepare(container::InstanceSpec& spec) {
  bool host = m_ctx.engine.kind() == config::Engine::host;
  // Found before the instance starts: it is bind-mounted into it.
  std::string handler_host = find_handler(host);
  if (!host && !handler_host.empty()) {
    container::check_bind_path(handler_host, "the handler bind (lithops-hpc's installed runtime-defs/handler.py)");
    spec.binds.push_back(handler_host + ":" + k_handler_in_image + ":ro");
  }
  m_handler_path = host ? handler_host : std::string(k_handler_in_image);
}

dispatch::HandlerCommand DispatchMode::handler_command(int h) const {
  dispatch::HandlerCommand c;
  c.argv = m_ctx.engine.exec_argv(m_ctx.instance_name, {m_ctx.cfg.singularity.python, m_handler_path});
  // Handlers never talk to the broker: the URL stays out of their environment.
  Env base = Env::current();
  for (const char* k : {"AMQP_URL", "SINGULARITYENV_AMQP_URL", "APPTAINERENV_AMQP_URL"}) {
    base.unset(k);
  }
  std::map<std::string, std::string> vars{{"LITHOPS_HPC_RANK", std::to_string(m_ctx.id.rank)},
                                          {"LITHOPS_HPC_HANDLER", h == m_ctx.slots ? "control" : std::to_string(h)}};
  // A GPU runtime: slot h alone sees its devices; the control handler runs no call and gets none.
  if (h >= 0 && static_cast<std::size_t>(h) < m_ctx.slot_env.size()) {
    vars.insert(m_ctx.slot_env[static_cast<std::size_t>(h)].begin(), m_ctx.slot_env[static_cast<std::size_t>(h)].end());
  }
  c.env = m_ctx.engine.child_env(base, vars);
  c.stderr_fd = m_ctx.log ? m_ctx.log->write_fd() : -1;
  return c;
}

void DispatchMode::start() {
  dispatch::DispatcherOptions dopts;
  dopts.slots = m_ctx.slots;
  dopts.queue = m_ctx.cfg.rabbitmq.queue;
  dopts.rank = m_ctx.id.rank;
  dopts.node = m_ctx.id.node;
  dopts.limits = {static_cast<std::size_t>(m_ctx.cfg.rabbitmq.max_message_bytes), m_ctx.cfg.rabbitmq.max_message_depth};
  dopts.rank_queue = dispatch::rank_queue(m_ctx.cfg.rabbitmq.queue, m_ctx.id.jobid, m_ctx.id.rank);
  m_rank_queue = dopts.rank_queue;
  dopts.runtime = m_ctx.cfg.singularity.runtime;  // checked by config: a valid name, or empty
  if (!dopts.runtime.empty()) {
    m_runtime_queue = dispatch::runtime_queue(dopts.queue, dopts.runtime);
  }
  dopts.memory_mb = job_memory_mb() / static_cast<std::uint64_t>(std::max(1, m_ctx.id.ranks_on_node));
  m_inflight = std::make_unique<dispatch::InflightRecord>(
      state_dir() + "/inflight/" + sanitize_name(m_ctx.id.node),
      sanitize_name(m_ctx.id.jobid) + "-" + std::to_string(m_ctx.id.rank) + "-" + std::to_string(::getpid()));
  dispatch::PoolOptions popts;
  popts.restart_limit = m_ctx.cfg.deploy.restart_limit;
  // A GPU runtime's slots own different devices: one that keeps dying says
  // more about its GPU than about the image, so it alone goes.
  popts.retire_slots = !m_ctx.slot_env.empty();
  m_pool = std::make_unique<dispatch::HandlerPool>(
      m_ctx.slots + 1, [this](int h) { return handler_command(h); }, popts, *this);
  // The dispatcher sends through the pool.
  m_dispatcher = std::make_unique<dispatch::Dispatcher>(dopts, *this, *m_pool, m_inflight.get());
#if LHPC_TEST_HOOKS
  if (const char* p = std::getenv("LITHOPS_HPC_LATENCY_LOG"); p && *p) {
    m_latency = std::make_unique<LatencyLog>(p);
    m_dispatcher->set_on_ack([this](const amqp::Delivery& d) { m_latency->on_ack(d); });
  }
#endif
  m_pool->start();
}

// --- ports -------------------------------------------------------------------

template <class F>
auto DispatchMode::guarded(F&& f) -> decltype(f()) {
  using R = decltype(f());
  if (!m_conn || !m_broker_error.empty()) {
    return R();
  }
  try {
    return f();
  } catch (const Error& e) {
    m_broker_error = e.what();
    return R();
  }
}

void DispatchMode::ack(std::uint64_t tag) {
  guarded([&] { m_conn->ack(tag); });
}
void DispatchMode::reject(std::uint64_t tag, bool requeue) {
  guarded([&] { m_conn->reject(tag, requeue); });
}
std::uint64_t DispatchMode::publish(const std::string& rk, const std::string& body, const amqp::Properties& p) {
  return guarded([&] { return m_conn->publish(rk, body, p); });
}
std::uint64_t DispatchMode::publish_to_exchange(const std::string& exchange, const std::string& body,
                                                const amqp::Properties& p) {
  return guarded([&] { return m_conn->publish_to_exchange(exchange, body, p); });
}
void DispatchMode::declare_queue(const std::string& name) {
  guarded([&] { m_conn->declare_queue_counted(name); });
}
void DispatchMode::declare_exchange(const std::string& name) {
  guarded([&] { m_conn->declare_exchange_async(name, "fanout"); });
}
void DispatchMode::set_prefetch(int n) {
  guarded([&] { m_conn->qos_async(static_cast<std::uint16_t>(n)); });
}
void DispatchMode::set_slot_consumer(bool active) {
  // Started at once unless a task came in the last k_slot_consumer_delay:
  // then the next one is most likely on its way already (a backlog, and the
  // ack just sent), and starting it would cost a consume and a cancel per
  // task. It starts once no task has come for that long.
  m_slot_wanted = active;
  if (active) {
    m_slot_due = m_last_task_delivery + k_slot_consumer_delay;
    start_slot_consumer_when_due(Clock::now());
    return;
  }
  guarded([&] {
    if (!m_slot_tag.empty()) {
      spdlog::debug("slot consumer {} cancelled: every slot busy", m_slot_tag);
      m_conn->cancel_async(m_slot_tag);
      m_slot_tag.clear();
    }
    if (!m_runtime_slot_tag.empty()) {
      m_conn->cancel_async(m_runtime_slot_tag);
      m_runtime_slot_tag.clear();
    }
  });
}

bool DispatchMode::task_slot_consumer_missing() const {
  return m_slot_wanted && m_slot_tag.empty() && !task_queue_cancelled();
}

bool DispatchMode::runtime_slot_consumer_missing() const {
  return m_slot_wanted && !m_runtime_queue.empty() && m_runtime_slot_tag.empty() && !runtime_queue_cancelled();
}

void DispatchMode::start_slot_consumer_when_due(Clock::time_point now) {
  // Each queue's on its own: one whose consumers the broker cancelled gets
  // its slot consumer once restore_consumers_when_due declared it again.
  bool task = task_slot_consumer_missing();
  bool runtime = runtime_slot_consumer_missing();
  if ((!task && !runtime) || now < m_slot_due || !m_conn || m_ctx.state() != State::running) {
    return;
  }
  guarded([&] {
    amqp::ConsumeArgs a;
    a.priority = k_slot_priority;
    a.nowait = true;
    auto n = std::to_string(++m_slot_consumers);
    if (task) {
      a.tag = "lhpc-slots-" + n;
      m_slot_tag = m_conn->consume(m_ctx.cfg.rabbitmq.queue, a);
      spdlog::debug("slot consumer {} started: a slot is free", m_slot_tag);
    }
    if (runtime) {
      a.tag = "lhpc-runtime-slots-" + n;
      m_runtime_slot_tag = m_conn->consume(m_runtime_queue, a);
    }
  });
}
void DispatchMode::stop_consuming() {
  m_slot_wanted = false;
  guarded([&] {
    m_conn->cancel_async(k_reserve_tag);
    if (!m_slot_tag.empty()) {
      m_conn->cancel_async(m_slot_tag);
      m_slot_tag.clear();
    }
    if (!m_runtime_queue.empty()) {
      m_conn->cancel_async(k_runtime_reserve_tag);
    }
    if (!m_runtime_slot_tag.empty()) {
      m_conn->cancel_async(m_runtime_slot_tag);
      m_runtime_slot_tag.clear();
    }
  });
}

void DispatchMode::handler_ready(int h, const dispatch::Json&) { m_dispatcher->on_handler_ready(h); }
void DispatchMode::handler_reply(int h, const dispatch::Json& reply) { m_dispatcher->on_handler_reply(h, reply); }
void DispatchMode::handler_lost(int h, const std::string& why) {
  m_ctx.instance.check_soon();
  m_dispatcher->on_handler_lost(h, why);
}
void DispatchMode::handler_failed_to_start(int) {
  m_ctx.instance.check_soon();
  // Why it died is in its output, which is in the log file, not above.
  if (m_ctx.log) {
    m_ctx.log->sync();
    auto lines = m_ctx.log->tail();
    std::size_t from = lines.size() > 10 ? lines.size() - 10 : 0;
    spdlog::error("last lines of handler output ({}):", m_ctx.log->path());
    for (std::size_t i = from; i < lines.size(); ++i) {
      spdlog::error("  | {}", lines[i]);
    }
  }
}

void DispatchMode::handler_retired(int h, const std::string& why) {
  m_ctx.note_error(fmt::format("slot {} out of service: handler {}", h, why));
}

// --- the broker --------------------------------------------------------------

milliseconds DispatchMode::pump_every() const {
  // rabbitmq-c sends heartbeats only while it reads.
  return milliseconds(std::max(1, m_ctx.cfg.rabbitmq.heartbeat) * 250);
}

void DispatchMode::connect_when_due(Clock::time_point now) {
  // Connect once a slot handler is ready: a node whose handlers cannot start
  // never takes messages from healthy ones.
  if (m_reconnect->connecting()) {
    take_connection();
    return;
  }
  if (m_conn || m_ctx.state() != State::running || m_pool->ready_count() == 0 || !m_reconnect->due(now)) {
    return;
  }
  Subscription sub;
  sub.queue = m_ctx.cfg.rabbitmq.queue;
  sub.rank_queue = m_rank_queue;
  sub.prefetch = m_dispatcher->desired_prefetch();
  sub.slot_consumer = m_dispatcher->desired_slot_consumer();
  sub.rank_channel = k_rank_channel;
  sub.slot_priority = k_slot_priority;
  sub.slot_tag = "lhpc-slots-1";
  sub.reserve_tag = k_reserve_tag;
  sub.rank_tag = k_rank_tag;
  sub.runtimes_exchange = dispatch::runtimes_exchange(sub.queue);
  sub.runtime_queue = m_runtime_queue;
  sub.runtime_slot_tag = "lhpc-runtime-slots-1";
  sub.runtime_reserve_tag = k_runtime_reserve_tag;
  m_connecting_prefetch = sub.prefetch;
  m_connecting_slot_consumer = sub.slot_consumer;
  m_reconnect->start(sub);
}

void DispatchMode::take_connection() {
  auto r = m_reconnect->take();
  if (!r) {
    return;
  }
  if (!r->link) {
    m_ctx.note_error(r->error);
    spdlog::warn("{}; retrying in {:.1f} s", r->error, r->retry_in.count() / 1000.0);
    return;
  }
  if (m_ctx.state() != State::running) {
    return;  // draining or failed meanwhile: close it again (nothing was delivered to us yet)
  }
  m_conn = std::move(r->link);
  m_conn->set_max_body(static_cast<std::uint64_t>(m_ctx.cfg.rabbitmq.max_message_bytes));
  m_reserve_cancelled = m_slot_cancelled = m_rank_cancelled = false;
  m_runtime_reserve_cancelled = m_runtime_slot_cancelled = false;
  m_slot_tag = std::move(r->slot_tag);
  m_runtime_slot_tag = m_slot_tag.empty() || m_runtime_queue.empty() ? "" : "lhpc-runtime-slots-1";
  m_slot_consumers = m_slot_tag.empty() ? 0 : 1;
  m_slot_wanted = !m_slot_tag.empty();
  m_broker_error.clear();
  m_last_pump = Clock::now();
  m_dispatcher->on_connected(m_connecting_prefetch, m_connecting_slot_consumer);
  spdlog::info("{} {}{} on {} with {} slots (prefetch {}), runtime {}",
               m_connected_once ? "reconnected: consuming" : "consuming", m_ctx.cfg.rabbitmq.queue,
               m_runtime_queue.empty() ? "" : " and " + m_runtime_queue, m_conn->redacted_url(), m_ctx.slots,
               m_connecting_prefetch, m_runtime_queue.empty() ? "any (none set)" : m_ctx.cfg.singularity.runtime);
  m_connected_once = true;
}

void DispatchMode::lost(std::string why) {  // by value: callers pass m_broker_error, cleared here
  if (auto t = note_close(); !t.empty()) {
    why = std::move(t);
  }
  m_conn.reset();  // broken: no polite close; the broker requeues what we held
  m_slot_tag.clear();
  m_runtime_slot_tag.clear();
  m_slot_wanted = false;
  m_broker_error.clear();
  m_dispatcher->on_disconnected();
  m_ctx.note_error(why);
  if (m_ctx.state() == State::draining) {
    spdlog::warn("lost the broker while draining: {}", why);
    return;
  }
  auto delay = m_reconnect->lost();
  spdlog::warn("lost the broker: {}; reconnecting in {:.1f} s", why, delay.count() / 1000.0);
}

void DispatchMode::pump(bool readable) {
  if (!m_conn || !m_broker_error.empty()) {
    return;  // a port call already found it broken: lost() follows
  }
  try {
    m_conn->pump(readable);
    m_last_pump = Clock::now();
    amqp::Delivery d;
    while (m_broker_error.empty() && m_conn && m_conn->next_delivery(d)) {
      if (d.channel != k_rank_channel) {
        m_last_task_delivery = m_last_pump;
      }
      m_dispatcher->on_delivery(std::move(d));
    }
    if (m_conn) {
      for (const auto& c : m_conn->take_confirms()) {
        m_dispatcher->on_confirm(c);
      }
    }
    if (m_conn) {
      for (const auto& q : m_conn->take_declared()) {
        m_dispatcher->on_declared(q.queue, q.consumers);
      }
    }
    if (m_conn) {
      on_cancelled(m_conn->take_cancelled(), m_last_pump);
    }
  } catch (const Error& e) {
    m_broker_error = e.what();
  }
}

// --- one round -----------------------------------------------------------------

milliseconds DispatchMode::poll_timeout(milliseconds max_wait, Clock::time_point now) const {
  milliseconds timeout = max_wait;
  auto sooner = [&](Clock::time_point t) { timeout = std::min(timeout, until(t, now)); };
  if (m_conn) {
    if (m_conn->buffered()) {
      timeout = milliseconds(0);
    }
    sooner(m_last_pump + pump_every());
    if (task_slot_consumer_missing() || runtime_slot_consumer_missing()) {
      sooner(m_slot_due);
    }
    if (restore_pending()) {
      sooner(m_restore_due);
    }
  } else if (m_reconnect->connecting()) {
    sooner(now + milliseconds(20));  // the helper thread's result
  } else if (m_ctx.state() == State::running && m_pool->ready_count() > 0) {
    sooner(m_reconnect->next_attempt());
  }
  for (auto t : {m_pool->next_deadline(), m_ctx.instance.next_deadline(), m_dispatcher->next_deadline()}) {
    if (t) {
      sooner(*t);
    }
  }
  if (m_ctx.state() == State::draining) {
    sooner(m_ctx.drain_deadline());
  }
  return timeout;
}

std::optional<Done> DispatchMode::step(milliseconds max_wait) {
  auto now = Clock::now();
  std::vector<pollfd> fds;
  std::vector<int> tags;  // -1 broker, >= 0 pool
  if (m_conn) {
    fds.push_back({m_conn->fd(), POLLIN, 0});
    tags.push_back(-1);
  }
  m_pool->add_pollfds(fds, tags);
  m_ctx.poll(fds, poll_timeout(max_wait, now));
  bool broker_readable = false;
  for (std::size_t i = 0; i < fds.size(); ++i) {
    if (!fds[i].revents) {
      continue;
    }
    if (tags[i] == -1) {
      broker_readable = true;
    } else {
      m_pool->handle(tags[i], fds[i].revents);
    }
  }
  return after_poll(broker_readable, Clock::now());
}

std::optional<Done> DispatchMode::after_poll(bool broker_readable, Clock::time_point now) {
  if (m_conn && (broker_readable || m_conn->buffered() || now - m_last_pump >= pump_every())) {
    pump(broker_readable);
  }
  m_pool->tick(now);
  if (m_conn) {
    m_dispatcher->on_tick(now);
  }
  restore_consumers_when_due(now);
  start_slot_consumer_when_due(now);
  if (!m_broker_error.empty()) {
    lost(m_broker_error);
  }
  if (m_pool->failed()) {
    bool gpus_out = !m_ctx.slot_env.empty();
    for (int h = 0; h < m_ctx.slots; ++h) {
      gpus_out = gpus_out && !m_pool->retired_why(h).empty();
    }
    throw Error(Exit::engine,
                fmt::format("handlers of rank {} on {} cannot be kept running: {}", m_ctx.id.rank, m_ctx.id.node,
                            m_pool->last_error()),
                gpus_out ? "every GPU slot of this rank kept dying: check its GPUs (nvidia-smi, the handler's output "
                           "in lithops-hpc logs); the rank consumes nothing more"
                         : "check singularity.python and that Lithops imports in the image (the handler's last "
                           "output lines are above; all of it: lithops-hpc logs); "
                           "deploy.restart_limit sets how many deaths a minute a handler may have");
  }
  m_ctx.instance.supervise(now);
  // Handlers spawned into an instance that is down would only die: wait for it.
  m_pool->hold_restarts(m_ctx.instance.restarting());
  connect_when_due(now);
#if LHPC_TEST_HOOKS
  if (m_latency) {
    m_latency->maybe_write(now);
  }
#endif
  if (m_ctx.state() == State::draining) {
    return check_drained(now);
  }
  return std::nullopt;
}

std::optional<Done> DispatchMode::check_drained(Clock::time_point now) {
  if (m_dispatcher->idle()) {
    spdlog::info("drained: every running task finished");
    return Done{};
  }
  if (now >= m_ctx.drain_deadline()) {
    spdlog::warn("drain timeout: {} calls still running are given back to the queue", m_dispatcher->busy_slots());
    m_dispatcher->abort();
    if (!m_broker_error.empty()) {
      lost(m_broker_error);
    }
    // Given back: stop them now rather than run beside their redelivery.
    return Done{milliseconds(0)};
  }
  return std::nullopt;
}

// --- lifecycle parts -------------------------------------------------------------

void DispatchMode::drain() {
  if (!m_dispatcher) {
    return;  // never started
  }
  spdlog::info("draining: no new tasks; {} running get {:.0f} s to finish", m_dispatcher->busy_slots(),
               m_ctx.cfg.deploy.drain_timeout);
  m_dispatcher->drain();
}

void DispatchMode::abort() {
  if (!m_dispatcher) {
    return;
  }
  m_dispatcher->drain();
  m_dispatcher->abort();
}

void DispatchMode::finish(milliseconds handler_grace) {
#if LHPC_TEST_HOOKS
  if (m_latency) {
    m_latency->write();
  }
#endif
  log_totals();
  m_conn.reset();  // polite close: anything still unacked goes back to the queue
  // Idle handlers exit at once on EOF; busy ones only after an abort.
  if (m_pool) {
    m_pool->stop(handler_grace);
  }
}

void DispatchMode::stop() {
  m_conn.reset();
  if (m_pool) {  // null when start() threw before the pool existed
    m_pool->stop(milliseconds(2000));
  }
}

void DispatchMode::fill(WorkerStats& s) const {
  if (!m_dispatcher || !m_pool) {
    return;  // never started
  }
  const auto& c = m_dispatcher->counters();
  s.slots_busy = m_dispatcher->busy_slots();
  s.tasks_done = c.tasks_done;
  s.tasks_failed = c.tasks_failed;
  s.tasks_requeued = c.tasks_requeued;
  s.dead_lettered = c.dead_lettered;
  s.broker_connected = m_conn != nullptr;
  s.consuming = consuming();
  s.broker_blocked = m_conn && m_conn->blocked();
  s.duplicates = c.duplicates;
  s.consumer_timeouts = c.consumer_timeouts;
  if (s.state == State::running && m_pool->ready_count() == 0) {
    s.state = State::starting;
  }
  s.restarts += m_pool->restarts();
  for (int h = 0; h < m_ctx.slots; ++h) {
    if (const auto& why = m_pool->retired_why(h); !why.empty()) {
      s.gpus_out[h] = why;
    }
  }
  s.slots_total -= static_cast<int>(s.gpus_out.size());
}

}  // namespace lhpc::worker
