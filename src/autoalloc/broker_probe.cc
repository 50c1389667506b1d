#include "autoalloc/broker_probe.h"

#include <spdlog/spdlog.h>

#include "util/error.h"

namespace lhpc::autoalloc {

BrokerProbe::BrokerProbe(amqp::Options broker, std::string queue)
    : m_broker(std::move(broker)), m_queue(std::move(queue)) {}

BrokerProbe::~BrokerProbe() = default;

std::optional<QueueLook> BrokerProbe::look() {
  try {
    if (!m_conn) {
      m_conn = std::make_unique<amqp::Connection>(m_broker);
    }
    ++m_queries;
    auto info = m_conn->queue_info(m_queue);
    if (!info) {
      m_conn.reset();      // the channel is closed; a new connection next poll
      return QueueLook{};  // no queue yet: nothing published
    }
    return QueueLook{info->messages, static_cast<int>(info->consumers)};
  } catch (const Error& e) {
    m_conn.reset();
    spdlog::warn("cannot ask the broker for queue '{}': {}", m_queue, e.what());
    return std::nullopt;
  }
}

}  // namespace lhpc::autoalloc
