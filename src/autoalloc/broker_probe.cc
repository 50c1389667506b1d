#include "autoalloc/broker_probe.h"

#include <spdlog/spdlog.h>

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

std::optional<QueueLook> BrokerProbe::look_at(const std::string& queue, bool runtime) {
  try {
    if (!m_conn) {
      m_conn = std::make_unique<amqp::Connection>(m_broker);
      m_declared.clear();
    }
    ++m_queries;
    if (!m_declared.contains(queue)) {
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
