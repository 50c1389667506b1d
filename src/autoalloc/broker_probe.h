// The QueueProbe port (ports.h) on the broker: a passive declare of the task
// queue on one long-lived connection, made again after any failure.
#pragma once

#include <memory>
#include <string>

#include "amqp/connection.h"
#include "autoalloc/ports.h"

namespace lhpc::autoalloc {

class BrokerProbe final : public QueueProbe {
public:
  BrokerProbe(amqp::Options broker, std::string queue);
  ~BrokerProbe() override;
  std::optional<QueueLook> look() override;
  unsigned long long queries() const override { return m_queries; }

private:
  amqp::Options m_broker;
  std::string m_queue;
  std::unique_ptr<amqp::Connection> m_conn;
  unsigned long long m_queries = 0;
};

}  // namespace lhpc::autoalloc
