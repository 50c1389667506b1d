// The broker as dispatch mode reaches it, behind two small ports: a link
// (the calls made on one open connection) and a connector (links made in the
// background, with backoff after a failure or a loss). The real ones wrap
// amqp::Connection and amqp::Reconnector (make_amqp_connector); unit tests
// give a Worker a fake one. What a new link subscribes to is data
// (Subscription), so the fake sees it and the real one does the AMQP calls.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "amqp/connection.h"

namespace lhpc::worker {

// One open connection. Calls throw Error(Exit::broker) when it broke.
class BrokerLink {
public:
  virtual ~BrokerLink() = default;  // closes politely when still healthy
  virtual int fd() const = 0;
  // Data already read that poll() would not announce: pump() without waiting.
  virtual bool buffered() const = 0;
  virtual const std::string& redacted_url() const = 0;
  virtual void pump(bool readable) = 0;
  virtual bool next_delivery(amqp::Delivery& out) = 0;
  virtual std::vector<amqp::Confirm> take_confirms() = 0;
  // Consumers the broker cancelled since the last call (queue deleted, ...).
  virtual std::vector<amqp::CancelledConsumer> take_cancelled() = 0;
  // connection.blocked (a broker memory or disk alarm) until unblocked.
  virtual bool blocked() const = 0;
  // Why the broker closed a channel or the connection, once it did.
  virtual std::optional<amqp::BrokerClose> closed() const = 0;
  // Bodies over this many bytes are dropped as they arrive (Delivery::oversized).
  virtual void set_max_body(std::uint64_t bytes) = 0;
  // queue.declare without waiting for the reply (a refusal closes the channel).
  // A publish after it on channel 1 reaches the queue.
  virtual void declare_queue_async(const std::string& queue, bool durable, bool auto_delete) = 0;
  // The same, durable, not nowait: its declare-ok (the queue's consumer
  // count) is returned by a later take_declared().
  virtual void declare_queue_counted(const std::string& queue) { declare_queue_async(queue, true, false); }
  virtual std::vector<amqp::DeclaredQueue> take_declared() { return {}; }
  // exchange.declare (durable) and queue.bind (routing key ""), nowait.
  virtual void declare_exchange_async(const std::string& exchange, const std::string& type) = 0;
  virtual void bind_queue_async(const std::string& queue, const std::string& exchange) = 0;
  virtual void ack(std::uint64_t tag) = 0;
  virtual void reject(std::uint64_t tag, bool requeue) = 0;
  // To the default exchange; returns the publisher-confirm sequence number.
  virtual std::uint64_t publish(const std::string& routing_key, std::string_view body,
                                const amqp::Properties& props) = 0;
  // Through a named exchange (the runtimes' fanout), routing key "".
  virtual std::uint64_t publish_to_exchange(const std::string& exchange, std::string_view body,
                                            const amqp::Properties& props) = 0;
  virtual void qos_async(std::uint16_t prefetch) = 0;  // channel 1, global
  virtual std::string consume(const std::string& queue, const amqp::ConsumeArgs& args) = 0;
  virtual void cancel_async(const std::string& consumer_tag) = 0;
};

// What a new link declares and consumes before it is handed over.
struct Subscription {
  std::string queue;       // the task queue (and <queue>.dead)
  std::string rank_queue;  // this rank's own queue, no acks, on its own channel
  int prefetch = 1;        // per channel 1, global
  bool slot_consumer = false;
  std::uint16_t rank_channel = 2;
  int slot_priority = 10;
  std::string slot_tag;     // the slot consumer's tag
  std::string reserve_tag;  // the reserve consumer's tag
  std::string rank_tag;     // the rank queue consumer's tag
  // The runtime's queue (dispatch/runtime.h), consumed on channel 1 beside
  // the task queue by the same two kinds of consumer; empty: none. Bound to
  // runtimes_exchange, which is declared in any case (get_metadata of
  // another runtime is published there).
  std::string runtime_queue;
  std::string runtimes_exchange;
  std::string runtime_slot_tag;
  std::string runtime_reserve_tag;
};

class BrokerConnector {
public:
  using Clock = std::chrono::steady_clock;
  struct Result {
    std::unique_ptr<BrokerLink> link;  // null: the attempt failed
    std::string slot_tag;              // the slot consumer's tag; empty when none was started
    std::string error;                 // why it failed (URL redacted)
    std::chrono::milliseconds retry_in{0};
  };
  virtual ~BrokerConnector() = default;
  // No attempt runs and the backoff delay has passed.
  virtual bool due(Clock::time_point now) const = 0;
  virtual bool connecting() const = 0;
  virtual Clock::time_point next_attempt() const = 0;
  // Starts one attempt in the background.
  virtual void start(const Subscription& sub) = 0;
  // The finished attempt's outcome, once; nullopt while it still runs.
  virtual std::optional<Result> take() = 0;
  // A link this connector made broke: returns how long until the next attempt.
  virtual std::chrono::milliseconds lost() = 0;
};

std::unique_ptr<BrokerConnector> make_amqp_connector(const amqp::Options& opts);

}  // namespace lhpc::worker
