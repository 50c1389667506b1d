#include "autoalloc/broker_probe.h"

#include <spdlog/spdlog.h>

#include "autoalloc/controller.h"
#include "dispatch/runtime.h"
#include "util/error.h"

namespace lhpc::autoalloc {

BrokerProbe::BrokerProbe(amqp::Options broker, std::string queue)
    : m_broker(std::move(broker)), m_queue(std::move(queue)) {}

BrokerProbe::~BrokerProbe() = default;

std::optional<QueueLook> BrokerProbe::look() { return look_at(m_queue, false); }

std::optional<QueueLook> BrokerProbe::look_runtime(const std::string& runtime) {
  return look_at(dispatch::runtime_queue(m_queue, runtime), true);
}

amqp::Connection& BrokerProbe::connection() {
  if (!m_conn) {
    m_conn = std::make_unique<amqp::Connection>(m_broker);
    m_declared.clear();
    m_copies = false;
    m_confirms = false;
  }
  return *m_conn;
}

void BrokerProbe::declare(const std::string& queue, bool runtime) {
  if (m_declared.contains(queue)) {
    return;
  }
  // As a deployment declares them (worker/broker.cc): the same arguments
  // (none), or the broker would refuse one of the two declarations.
  m_conn->declare_queue(queue, true);
  if (runtime) {
    auto exchange = dispatch::runtimes_exchange(m_queue);
    m_conn->declare_exchange(exchange, "fanout");
    m_conn->bind_queue(queue, exchange);
  }
  m_declared.insert(queue);
}

std::optional<QueueProbe::Taken> BrokerProbe::take(Source from, const std::string& runtime) {
  std::string queue = from == Source::runtime_queue ? dispatch::runtime_queue(m_queue, runtime) : m_queue;
  try {
    connection();
    if (from != Source::copies) {
      declare(queue, from == Source::runtime_queue);
    }
    if (from == Source::copies) {
      auto exchange = dispatch::runtimes_exchange(m_queue);
      queue = exchange + "." + job_name();
      if (!m_copies) {
        m_conn->declare_exchange(exchange, "fanout");
        m_conn->declare_queue(queue, false, true, true);
        m_conn->bind_queue(queue, exchange);
        auto wanted = dispatch::wanted_exchange(m_queue);
        m_conn->declare_exchange(wanted, "fanout");
        m_conn->bind_queue(queue, wanted);
        m_copies = true;
      }
    }
    ++m_queries;
    auto d = m_conn->get(queue);
    if (!d) {
      return std::nullopt;
    }
    auto wanted = from == Source::copies ? amqp::table_string(d->props.headers, dispatch::k_hdr_wanted_runtime) : "";
    return Taken{d->tag, std::move(d->body), std::move(wanted)};
  } catch (const Error& e) {
    m_conn.reset();
    spdlog::warn("cannot take a message from queue '{}': {}", queue, e.what());
    return std::nullopt;
  }
}

void BrokerProbe::settle(Source, std::uint64_t tag, bool done) {
  if (!m_conn) {
    return;  // lost with its connection: the broker has it back
  }
  try {
    if (done) {
      m_conn->ack(tag);
    } else {
      m_conn->reject(tag, true);
    }
  } catch (const Error& e) {
    m_conn.reset();
    spdlog::warn("cannot settle a message taken: {} (the broker puts it back)", e.what());
  }
}

bool BrokerProbe::move(const std::string& runtime, const std::string& body) {
  auto queue = dispatch::runtime_queue(m_queue, runtime);
  try {
    connection();
    if (!m_confirms) {
      m_conn->confirm_select();
      m_confirms = true;
    }
    m_declared.erase(queue);  // declared before every move, as a deployment does (dispatcher.cc)
    declare(queue, true);
    amqp::Properties p;
    p.delivery_mode = 2;
    m_conn->publish("", queue, body, p);
    ++m_queries;
    if (m_conn->wait_confirms(std::chrono::steady_clock::now() + m_broker.timeout)) {
      return true;
    }
    spdlog::warn("moving a task to queue '{}': no confirm from the broker in time; it stays in '{}'", queue, m_queue);
  } catch (const Error& e) {
    spdlog::warn("cannot move a task to queue '{}': {}", queue, e.what());
  }
  m_conn.reset();  // an unconfirmed publish: begin again on a new connection
  return false;
}

std::optional<QueueLook> BrokerProbe::look_at(const std::string& queue, bool runtime) {
  try {
    connection();
    ++m_queries;
    declare(queue, runtime);
    auto info = m_conn->queue_info(queue);
    if (!info) {
      m_declared.erase(queue);  // deleted since (lithops clean, a person): declared again at the next look
      return QueueLook{};
    }
    return QueueLook{info->messages, static_cast<int>(info->consumers)};
  } catch (const Error& e) {
    m_conn.reset();
    spdlog::warn("cannot ask the broker for queue '{}': {}", queue, e.what());
    return std::nullopt;
  }
}

}  // namespace lhpc::autoalloc
