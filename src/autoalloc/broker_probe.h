// The QueueProbe port (ports.h) on the broker: a passive declare of the task
// queue and of runtime queues on one long-lived connection, made again after
// any failure. Each queue is first declared once per connection as its users
// declare it (the task queue durable with no arguments, as the Lithops client
// and the workers do; a runtime queue also bound to the runtimes' exchange):
// a passive look at a queue nobody declared yet is a channel error the broker
// logs, twice a second at zero.
#pragma once

#include <memory>
#include <set>
#include <string>

#include "amqp/connection.h"
#include "autoalloc/ports.h"

namespace lhpc::autoalloc {

class BrokerProbe final : public QueueProbe {
public:
  BrokerProbe(amqp::Options broker, std::string queue);
  ~BrokerProbe() override;
  std::optional<QueueLook> look() override;
  std::optional<QueueLook> look_runtime(const std::string& runtime) override;
  unsigned long long queries() const override { return m_queries; }

private:
  amqp::Options m_broker;
  std::string m_queue;
  std::optional<QueueLook> look_at(const std::string& queue, bool runtime);
  std::unique_ptr<amqp::Connection> m_conn;
  std::set<std::string> m_declared;  // queues declared (and bound) on m_conn
  unsigned long long m_queries = 0;
};

}  // namespace lhpc::autoalloc
