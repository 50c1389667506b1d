// Dispatch mode's answers to broker faults that leave the connection up or
// tell us why it went: consumers the broker cancelled (the queue deleted and
// declared again, a node of a broker cluster lost), a channel closed for the
// broker's consumer_timeout, and connection.blocked. Kept apart from the
// poll round in dispatch_mode.cc.
#include "worker/dispatch_mode.h"

#include <spdlog/spdlog.h>

#include <string>
#include <vector>

#include "dispatch/runtime.h"
#include "util/error.h"

namespace lhpc::worker {

using std::chrono::milliseconds;

namespace {

// A consumer restored this long ago and not cancelled since is stable: the
// next cancel is restored after the first delay again.
constexpr std::chrono::seconds k_restore_stable{60};

double secs(milliseconds d) { return static_cast<double>(d.count()) / 1000.0; }

}  // namespace

bool DispatchMode::consuming() const {
  return m_conn && !m_reserve_cancelled && !m_runtime_reserve_cancelled && m_ctx.state() == State::running &&
         m_pool->ready_count() > 0;
}

void DispatchMode::on_cancelled(std::vector<amqp::CancelledConsumer> gone, Clock::time_point now) {
  if (gone.empty() || m_ctx.state() != State::running) {
    return;  // draining: we cancelled them ourselves, or they stay gone
  }
  bool was = restore_pending();
  for (const auto& c : gone) {
    if (c.channel == k_rank_channel && c.tag == k_rank_tag) {
      m_rank_cancelled = true;
    } else if (c.tag == k_reserve_tag) {
      m_reserve_cancelled = true;
    } else if (!m_runtime_queue.empty() && c.tag == k_runtime_reserve_tag) {
      m_runtime_reserve_cancelled = true;
    } else if (!m_slot_tag.empty() && c.tag == m_slot_tag) {
      // Started again by start_slot_consumer_when_due once the queue is declared.
      m_slot_tag.clear();
      m_slot_cancelled = true;
    } else if (!m_runtime_slot_tag.empty() && c.tag == m_runtime_slot_tag) {
      m_runtime_slot_tag.clear();
      m_runtime_slot_cancelled = true;
    }  // else one we cancelled ourselves meanwhile
  }
  if (was || !restore_pending()) {
    return;  // a restore is already due, or nothing of ours is gone
  }
  if (now - m_restored_at > k_restore_stable) {
    m_restore_backoff.reset();
  }
  auto delay = m_restore_backoff.next();
  m_restore_due = now + delay;
  auto q = cancelled_queues();
  m_ctx.note_error("the broker cancelled the consumer of " + q + " (queue deleted?)");
  spdlog::warn(
      "the broker cancelled our consumer of {} (queue deleted, or a broker node lost): not consuming; "
      "declaring and consuming it again in {:.1f} s",
      q, secs(delay));
}

std::string DispatchMode::cancelled_queues() const {
  std::vector<std::string> qs;
  if (task_queue_cancelled()) {
    qs.push_back(m_ctx.cfg.rabbitmq.queue);
  }
  if (runtime_queue_cancelled()) {
    qs.push_back(m_runtime_queue);
  }
  if (m_rank_cancelled) {
    qs.push_back(m_rank_queue);
  }
  std::string out;
  for (std::size_t i = 0; i < qs.size(); ++i) {
    out += (i == 0 ? "" : i + 1 == qs.size() ? " and " : ", ") + qs[i];
  }
  return out;
}

void DispatchMode::restore_consumers_when_due(Clock::time_point now) {
  if (!restore_pending() || !m_conn || now < m_restore_due || m_ctx.state() != State::running) {
    return;
  }
  // Without waiting for replies: a refusal (the queue declared again with
  // other arguments) closes the channel and the reconnect takes over.
  if (!m_broker_error.empty()) {
    return;  // lost() follows
  }
  try {
    const auto& q = m_ctx.cfg.rabbitmq.queue;
    if (task_queue_cancelled()) {
      m_conn->declare_queue_async(q, true, false);  // as the Lithops client declares it
      m_conn->declare_queue_async(q + ".dead", true, false);
    }
    if (m_reserve_cancelled) {
      amqp::ConsumeArgs a;
      a.tag = k_reserve_tag;
      a.nowait = true;
      m_conn->consume(q, a);
    }
    if (runtime_queue_cancelled()) {
      restore_runtime_queue();
    }
    if (m_rank_cancelled) {
      m_conn->declare_queue_async(m_rank_queue, false, /*auto_delete=*/true);
      amqp::ConsumeArgs r;
      r.channel = k_rank_channel;
      r.tag = k_rank_tag;
      r.no_ack = true;
      r.nowait = true;
      m_conn->consume(m_rank_queue, r);
    }
  } catch (const Error& e) {
    m_broker_error = e.what();  // lost() follows
    return;
  }
  spdlog::info("restored: consuming {} again", cancelled_queues());
  m_reserve_cancelled = m_slot_cancelled = m_rank_cancelled = false;
  m_runtime_reserve_cancelled = m_runtime_slot_cancelled = false;
  m_restored_at = now;
  m_ctx.note_error({});
}

void DispatchMode::restore_runtime_queue() {
  // As subscribe() makes them (worker/broker.cc): the queue went with its
  // binding to the runtimes' fanout, which may have gone too; the slot
  // consumer is started again by start_slot_consumer_when_due.
  const auto exchange = dispatch::runtimes_exchange(m_ctx.cfg.rabbitmq.queue);
  m_conn->declare_exchange_async(exchange, "fanout");
  m_conn->declare_queue_async(m_runtime_queue, true, false);
  m_conn->bind_queue_async(m_runtime_queue, exchange);
  if (m_runtime_reserve_cancelled) {
    amqp::ConsumeArgs a;
    a.tag = k_runtime_reserve_tag;
    a.nowait = true;
    m_conn->consume(m_runtime_queue, a);
  }
}

void DispatchMode::log_totals() const {
  const auto& c = m_dispatcher->counters();
  spdlog::info(
      "stopped: {} call{} done, {} failed, {} requeued, {} dead-lettered, {} duplicate{} (finished after "
      "the broker took the message back: at-least-once), {} consumer timeout{}",
      c.tasks_done, c.tasks_done == 1 ? "" : "s", c.tasks_failed, c.tasks_requeued, c.dead_lettered, c.duplicates,
      c.duplicates == 1 ? "" : "s", c.consumer_timeouts, c.consumer_timeouts == 1 ? "" : "s");
}

std::string DispatchMode::note_close() {
  if (!m_conn || !m_conn->closed()) {
    return {};
  }
  auto timeout = amqp::consumer_timeout_of(*m_conn->closed());
  if (!timeout) {
    return {};
  }
  auto what = m_dispatcher->on_consumer_timeout(milliseconds(*timeout));
  auto text = fmt::format(
      "the broker's consumer_timeout ({}) expired{}: it closed the channel and took the "
      "message back; raise consumer_timeout on the broker (lithops-hpc(1), FAILURE SEMANTICS)",
      *timeout > 0 ? fmt::format("{:g} s", static_cast<double>(*timeout) / 1000.0) : "?",
      what.empty() ? std::string() : " while " + what + " ran");
  spdlog::error("{}", text);
  return text;
}

}  // namespace lhpc::worker
