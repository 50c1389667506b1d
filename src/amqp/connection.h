// RAII wrapper over rabbitmq-c: one connection with channel 1 open (more on
// request: basic.qos is per channel, so a consumer that must not share a
// prefetch limit gets a channel of its own), amqp:// and
// amqps:// (CA file, peer and host name verification), vhosts, heartbeats,
// queue declaration, consume, ack/reject, publish with publisher confirms,
// and a non-blocking frame pump an event loop drives from poll().
//
// Errors throw lhpc::Error(Exit::broker); the URL in them is always redacted.
// rabbitmq-c only services heartbeats while it reads, so the owner must call
// pump() when fd() is readable and at least every heartbeat/2 seconds.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "config/config.h"

namespace lhpc::amqp {

// AMQP table values we read and write (other kinds are skipped on read).
using FieldValue = std::variant<std::int64_t, std::string, bool, double>;
using Table = std::map<std::string, FieldValue>;

std::int64_t table_int(const Table& t, const std::string& key, std::int64_t fallback = 0);
std::string table_string(const Table& t, const std::string& key);

struct Properties {
  std::string content_type;
  std::string correlation_id;
  std::string reply_to;
  std::string message_id;
  std::string expiration;          // per-message TTL in ms, as text
  std::uint8_t delivery_mode = 0;  // 2 = persistent; 0 = not set
  Table headers;
};

struct Delivery {
  std::uint16_t channel = 1;  // delivery tags are per channel
  std::uint64_t tag = 0;
  bool redelivered = false;
  std::string exchange;
  std::string routing_key;
  Properties props;
  std::string body;
  // The body was over Connection::set_max_body: dropped frame by frame as it
  // arrived (body is empty), `body_size` is what the broker announced.
  bool oversized = false;
  std::uint64_t body_size = 0;
};

// A consumer the broker cancelled (basic.cancel: its queue was deleted, a
// node of a broker cluster was lost, a policy changed).
struct CancelledConsumer {
  std::uint16_t channel = 1;
  std::string tag;
};

// Why the broker closed a channel or the connection (channel.close or
// connection.close); kept after the Connection threw.
struct BrokerClose {
  bool channel = true;  // false: the whole connection
  int code = 0;         // 406 PRECONDITION_FAILED, 404 NOT_FOUND, 320 CONNECTION_FORCED, ...
  std::string text;
};

// The broker's consumer_timeout (ms) when `c` closed a channel because a
// delivery was not acknowledged in time (RabbitMQ 3.8.15+: 406 "delivery
// acknowledgement on channel N timed out. Timeout value used: T ms ...");
// nullopt for any other close. 0 when the text names no value.
std::optional<std::int64_t> consumer_timeout_of(const BrokerClose& c);

// The broker's answer to a published message (publisher confirms).
// A queue.declare-ok that came back to an asynchronous declare sent with
// `reply` (declare_queue_async).
struct DeclaredQueue {
  std::string queue;
  std::uint32_t messages = 0;
  std::uint32_t consumers = 0;
};

struct Confirm {
  std::uint64_t seq = 0;
  bool ack = false;  // false: basic.nack, the broker did not take it
};

struct Options {
  std::string url;                           // amqp[s]://user:pass@host:port/vhost
  std::string ca_cert;                       // amqps: CA bundle; empty: the system's
  bool verify_peer = true;                   // amqps: certificate and host name
  int heartbeat = 60;                        // seconds; 0: none
  std::chrono::milliseconds timeout{10000};  // connect, login, each RPC
  std::string connection_name;               // shown by the broker (management UI)
};
Options options_from(const config::Rabbitmq& r);

// basic.consume's arguments beyond the queue's name.
struct ConsumeArgs {
  std::uint16_t channel = 1;
  std::string tag;  // empty: the broker names it
  bool no_ack = false;
  bool exclusive = false;
  std::optional<int> priority;  // x-priority: higher ones are served first
  bool nowait = false;          // no consume-ok (then `tag` must be set)
};

class Connection {
public:
  static constexpr std::uint16_t k_default_channel = 1;

  // Connects, logs in and opens channel 1; throws Error(Exit::broker).
  explicit Connection(const Options& opts);
  ~Connection();  // closes politely when still healthy (bounded by 2 s)
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int fd() const;
  // Frames or bytes already buffered in rabbitmq-c: poll() would not see them,
  // call pump() without waiting.
  bool buffered() const;
  const std::string& redacted_url() const { return m_redacted; }
  int heartbeat() const { return m_heartbeat; }

  // Synchronous RPCs, bounded by the RPC timeout.
  // Empty name: a server-named queue; returns the queue name.
  std::string declare_queue(const std::string& name, bool durable, bool exclusive = false, bool auto_delete = false);
  // Returns the message count of the queue (passive declare).
  std::uint32_t queue_depth(const std::string& name);
  // Ready messages and consumers of the queue (passive declare); nullopt
  // when it does not exist (the broker then closes the channel; it is
  // opened again, so the connection stays usable).
  struct QueueInfo {
    std::uint32_t messages = 0;
    std::uint32_t consumers = 0;
  };
  std::optional<QueueInfo> queue_info(const std::string& name);
  // A durable exchange of `type` ("fanout", "direct", ...), no arguments.
  void declare_exchange(const std::string& name, const std::string& type);
  void bind_queue(const std::string& queue, const std::string& exchange, const std::string& routing_key = "");
  // Another channel on this connection (2, 3, ...): its own prefetch limit.
  void open_channel(std::uint16_t channel);
  void qos(std::uint16_t prefetch, bool global, std::uint16_t channel = k_default_channel);
  // basic.get on channel 1 (acked later with ack() or reject()): one
  // message, or nullopt when the queue is empty. For a connection that
  // consumes nothing (the autoalloc controller's): frames of another kind
  // that arrive meanwhile are queued for pump() by rabbitmq-c.
  std::optional<Delivery> get(const std::string& queue);
  std::string consume(const std::string& queue, bool no_ack = false, bool exclusive = false);
  // Returns the consumer tag; with `nowait`, sent without waiting for a reply.
  std::string consume(const std::string& queue, const ConsumeArgs& args);
  void confirm_select();

  // Asynchronous: sent now, the reply (if any) is absorbed by pump().
  void qos_async(std::uint16_t prefetch, bool global, std::uint16_t channel = k_default_channel);
  void cancel_async(const std::string& consumer_tag, std::uint16_t channel = k_default_channel);
  void ack(std::uint64_t tag, bool multiple = false, std::uint16_t channel = k_default_channel);
  void reject(std::uint64_t tag, bool requeue, std::uint16_t channel = k_default_channel);
  // Returns the confirm sequence number (0 when confirms are off).
  std::uint64_t publish(const std::string& exchange, const std::string& routing_key, std::string_view body,
                        const Properties& props);

  // Reads whatever is available without blocking; deliveries and confirms
  // are queued for next_delivery()/take_confirms(). `readable`: poll() said so
  // (counts as life for the missed-heartbeat check). Throws on loss.
  void pump(bool readable = false);
  bool next_delivery(Delivery& out);
  std::vector<Confirm> take_confirms();
  std::size_t unconfirmed() const { return m_unconfirmed.size(); }
  // Consumers the broker cancelled since the last call (needs the
  // consumer_cancel_notify capability, which Connection announces).
  std::vector<CancelledConsumer> take_cancelled() { return std::exchange(m_cancelled, {}); }
  // connection.blocked (a memory or disk alarm): the broker reads nothing we
  // send until connection.unblocked. Empty reason: not blocked.
  bool blocked() const { return m_blocked; }
  const std::string& blocked_reason() const { return m_blocked_reason; }
  // The channel.close or connection.close that ended this connection, if any.
  const std::optional<BrokerClose>& closed() const { return m_closed; }
  // Bodies over this many bytes are not kept (Delivery::oversized); 0: no cap.
  void set_max_body(std::uint64_t bytes) { m_max_body = bytes; }
  // queue.declare with nowait: no reply; a refusal closes the channel later.
  // With `reply`, not nowait: its declare-ok is queued by pump() for
  // take_declared() (nothing waits for it).
  void declare_queue_async(const std::string& name, bool durable, bool auto_delete = false, bool reply = false);
  std::vector<DeclaredQueue> take_declared() { return std::exchange(m_declared_in, {}); }
  // exchange.declare (durable, no arguments) and queue.bind (routing key "")
  // with nowait, likewise: restoring a runtime queue the broker deleted.
  void declare_exchange_async(const std::string& name, const std::string& type);
  void bind_queue_async(const std::string& queue, const std::string& exchange);

  // For simple clients (ping, bench): pumps until `deadline`, returning early
  // once something was queued. Never blocks past the deadline.
  void wait(std::chrono::steady_clock::time_point deadline);
  // Pumps until every publish so far is confirmed; false on timeout.
  // Throws when the broker nacked one.
  bool wait_confirms(std::chrono::steady_clock::time_point deadline);

private:
  [[noreturn]] void fail(const std::string& what);
  void check_rpc(const char* what, std::uint16_t channel = k_default_channel);
  void on_method(std::uint16_t channel, std::uint32_t id, void* decoded);
  // on_method()'s cases.
  void begin_delivery(std::uint16_t channel, const void* decoded);
  void on_confirm(std::uint64_t tag, bool multiple, bool ack);
  [[noreturn]] void on_close(std::uint16_t channel, std::uint32_t id, const void* decoded);
  void on_blocked(std::uint32_t id, const void* decoded);
  void on_header(std::uint64_t body_size, const void* decoded);
  void on_body(const void* bytes, std::size_t len);
  void finish_content();

  struct State;
  std::unique_ptr<State> m_s;
  std::string m_redacted;
  int m_heartbeat = 0;
  bool m_broken = false;
  bool m_confirms = false;
  std::vector<CancelledConsumer> m_cancelled;
  bool m_blocked = false;
  std::string m_blocked_reason;
  std::optional<BrokerClose> m_closed;
  std::uint64_t m_max_body = 0;
  std::uint64_t m_next_seq = 1;
  std::set<std::uint64_t> m_unconfirmed;
  std::vector<Confirm> m_confirms_in;
  std::vector<DeclaredQueue> m_declared_in;
  std::deque<Delivery> m_deliveries;
  std::chrono::steady_clock::time_point m_last_recv;

  // A delivery being assembled from method, header and body frames.
  enum class Content { none, delivery, oversized, discard };
  Content m_content = Content::none;
  std::uint64_t m_body_size = 0;
  Delivery m_partial;
};

}  // namespace lhpc::amqp
