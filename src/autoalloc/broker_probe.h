// The QueueProbe port (ports.h) on the broker: a passive declare of the task
// queue and of runtime queues on one long-lived connection, made again after
// any failure. Each queue is first declared once per connection as its users
// declare it (the task queue durable with no arguments, as the Lithops client
// and the workers do; a runtime queue also bound to the runtimes' exchange):
// a passive look at a queue nobody declared yet is a channel error the broker
// logs, twice a second at zero. The controller's copies queue
// (<queue>.runtimes.<job name>, exclusive: it lives while the controller's
// connection does) is bound to the runtimes' fanout exchange on the first
// take() of each connection; moves are published with confirms, each
// awaited before anything else is asked.
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
  std::optional<Taken> take(Source from, const std::string& runtime) override;
  void settle(Source from, std::uint64_t tag, bool done) override;
  bool move(const std::string& runtime, const std::string& body) override;

private:
  amqp::Connection& connection();
  void declare(const std::string& queue, bool runtime);
  amqp::Options m_broker;
  std::string m_queue;
  std::optional<QueueLook> look_at(const std::string& queue, bool runtime);
  std::unique_ptr<amqp::Connection> m_conn;
  std::set<std::string> m_declared;  // queues declared (and bound) on m_conn
  bool m_copies = false;             // the copies queue declared and bound on m_conn
  bool m_confirms = false;           // confirm.select sent on m_conn
  unsigned long long m_queries = 0;
};

}  // namespace lhpc::autoalloc
