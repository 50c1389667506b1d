#include "worker/broker.h"

#include <utility>

#include "amqp/reconnect.h"

namespace lhpc::worker {

namespace {

class AmqpLink final : public BrokerLink {
public:
  explicit AmqpLink(std::unique_ptr<amqp::Connection> c) : m_c(std::move(c)) {}
  int fd() const override { return m_c->fd(); }
  bool buffered() const override { return m_c->buffered(); }
  const std::string& redacted_url() const override { return m_c->redacted_url(); }
  void pump(bool readable) override { m_c->pump(readable); }
  bool next_delivery(amqp::Delivery& out) override { return m_c->next_delivery(out); }
  std::vector<amqp::Confirm> take_confirms() override { return m_c->take_confirms(); }
  std::vector<amqp::CancelledConsumer> take_cancelled() override { return m_c->take_cancelled(); }
  bool blocked() const override { return m_c->blocked(); }
  std::optional<amqp::BrokerClose> closed() const override { return m_c->closed(); }
  void set_max_body(std::uint64_t bytes) override { m_c->set_max_body(bytes); }
  void declare_queue_async(const std::string& queue, bool durable, bool auto_delete) override {
    m_c->declare_queue_async(queue, durable, auto_delete);
  }
  void declare_queue_counted(const std::string& queue) override { m_c->declare_queue_async(queue, true, false, true); }
  std::vector<amqp::DeclaredQueue> take_declared() override { return m_c->take_declared(); }
  void declare_exchange_async(const std::string& exchange, const std::string& type) override {
    m_c->declare_exchange_async(exchange, type);
  }
  void bind_queue_async(const std::string& queue, const std::string& exchange) override {
    m_c->bind_queue_async(queue, exchange);
  }
  void ack(std::uint64_t tag) override { m_c->ack(tag); }
  void reject(std::uint64_t tag, bool requeue) override { m_c->reject(tag, requeue); }
  std::uint64_t publish(const std::string& rk, std::string_view body, const amqp::Properties& p) override {
    return m_c->publish("", rk, body, p);
  }
  std::uint64_t publish_to_exchange(const std::string& exchange, std::string_view body,
                                    const amqp::Properties& p) override {
    return m_c->publish(exchange, "", body, p);
  }
  void qos_async(std::uint16_t prefetch) override { m_c->qos_async(prefetch, true); }
  std::string consume(const std::string& queue, const amqp::ConsumeArgs& args) override {
    return m_c->consume(queue, args);
  }
  void cancel_async(const std::string& tag) override { m_c->cancel_async(tag); }

private:
  std::unique_ptr<amqp::Connection> m_c;
};

// Runs on the reconnector's helper thread: touches nothing but `c`.
std::string subscribe(amqp::Connection& c, const Subscription& s) {
  // Exactly as the Lithops client declares it: durable, no arguments.
  c.declare_queue(s.queue, true);
  c.declare_queue(s.queue + ".dead", true);
  // It must exist before a publish to it, or the broker closes the channel.
  c.declare_exchange(s.runtimes_exchange, "fanout");
  if (!s.runtime_queue.empty()) {
    c.declare_queue(s.runtime_queue, true);
    c.bind_queue(s.runtime_queue, s.runtimes_exchange);
  }
  c.confirm_select();
  // Per channel (global): the one limit RabbitMQ lets us change while
  // consuming, shared by the slot consumer and the reserve.
  c.qos(static_cast<std::uint16_t>(s.prefetch), true);
  amqp::ConsumeArgs a;
  std::string tag;
  if (s.slot_consumer) {
    a.tag = s.slot_tag;
    a.priority = s.slot_priority;
    tag = c.consume(s.queue, a);
  }
  if (!s.runtime_queue.empty()) {
    if (s.slot_consumer) {
      a.tag = s.runtime_slot_tag;
      c.consume(s.runtime_queue, a);
    }
    a.tag = s.runtime_reserve_tag;
    a.priority.reset();
    c.consume(s.runtime_queue, a);
  }
  a.tag = s.reserve_tag;
  a.priority.reset();
  c.consume(s.queue, a);
  // Gone with its last consumer; no acks. Not exclusive: standalone workers
  // of one job all are its rank 0. On a channel without a prefetch limit:
  // RabbitMQ holds back even no-ack deliveries on a channel at its limit.
  c.declare_queue(s.rank_queue, false, /*exclusive=*/false, /*auto_delete=*/true);
  c.open_channel(s.rank_channel);
  amqp::ConsumeArgs r;
  r.channel = s.rank_channel;
  r.tag = s.rank_tag;
  r.no_ack = true;
  c.consume(s.rank_queue, r);
  return tag;
}

class AmqpConnector final : public BrokerConnector {
public:
  explicit AmqpConnector(const amqp::Options& opts) : m_r(opts) {}
  bool due(Clock::time_point now) const override { return m_r.due(now); }
  bool connecting() const override { return m_r.connecting(); }
  Clock::time_point next_attempt() const override { return m_r.next_attempt(); }
  void start(const Subscription& sub) override {
    m_r.start([sub](amqp::Connection& c) { return subscribe(c, sub); });
  }
  std::optional<Result> take() override {
    auto r = m_r.take();
    if (!r) {
      return std::nullopt;
    }
    Result out;
    if (r->conn) {
      out.link = std::make_unique<AmqpLink>(std::move(r->conn));
    }
    out.slot_tag = std::move(r->consumer_tag);
    out.error = std::move(r->error);
    out.retry_in = r->retry_in;
    return out;
  }
  std::chrono::milliseconds lost() override { return m_r.lost(); }

private:
  amqp::Reconnector m_r;
};

}  // namespace

std::unique_ptr<BrokerConnector> make_amqp_connector(const amqp::Options& opts) {
  return std::make_unique<AmqpConnector>(opts);
}

}  // namespace lhpc::worker
