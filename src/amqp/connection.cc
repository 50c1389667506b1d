#include "amqp/connection.h"

#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/ssl_socket.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/time.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "util/error.h"
#include "util/fs.h"

namespace lhpc::amqp {

using Clock = std::chrono::steady_clock;

struct Connection::State {
  amqp_connection_state_t conn = nullptr;
  amqp_socket_t* socket = nullptr;  // owned by conn
};

namespace {

constexpr amqp_channel_t k_channel = 1;
const char* k_hint = "check rabbitmq.amqp_url (or AMQP_URL), that the broker runs and that this node can reach it";

timeval to_timeval(std::chrono::milliseconds ms) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(ms.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000);
  return tv;
}

std::string bytes_str(const amqp_bytes_t& b) {
  return b.len ? std::string(static_cast<const char*>(b.bytes), b.len) : std::string();
}

amqp_bytes_t str_bytes(const std::string& s) {
  amqp_bytes_t b;
  b.len = s.size();
  b.bytes = const_cast<char*>(s.data());
  return b;
}

// The system's CA bundle: rabbitmq-c 0.11 loads no default trust store.
std::string system_ca_bundle() {
  if (const char* f = std::getenv("SSL_CERT_FILE"); f && *f) {
    return f;
  }
  for (const char* p : {"/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                        "/etc/ssl/ca-bundle.pem", "/etc/pki/tls/cacert.pem", "/etc/ssl/cert.pem"}) {
    if (path_exists(p)) {
      return p;
    }
  }
  return {};
}

Table read_table(const amqp_table_t& t) {
  Table out;
  for (int i = 0; i < t.num_entries; ++i) {
    const auto& e = t.entries[i];
    std::string key = bytes_str(e.key);
    const auto& v = e.value;
    switch (v.kind) {
      case AMQP_FIELD_KIND_BOOLEAN: out[key] = static_cast<bool>(v.value.boolean); break;
      case AMQP_FIELD_KIND_I8: out[key] = static_cast<std::int64_t>(v.value.i8); break;
      case AMQP_FIELD_KIND_U8: out[key] = static_cast<std::int64_t>(v.value.u8); break;
      case AMQP_FIELD_KIND_I16: out[key] = static_cast<std::int64_t>(v.value.i16); break;
      case AMQP_FIELD_KIND_U16: out[key] = static_cast<std::int64_t>(v.value.u16); break;
      case AMQP_FIELD_KIND_I32: out[key] = static_cast<std::int64_t>(v.value.i32); break;
      case AMQP_FIELD_KIND_U32: out[key] = static_cast<std::int64_t>(v.value.u32); break;
      case AMQP_FIELD_KIND_I64: out[key] = static_cast<std::int64_t>(v.value.i64); break;
      case AMQP_FIELD_KIND_U64:
      case AMQP_FIELD_KIND_TIMESTAMP: out[key] = static_cast<std::int64_t>(v.value.u64); break;
      case AMQP_FIELD_KIND_F32: out[key] = static_cast<double>(v.value.f32); break;
      case AMQP_FIELD_KIND_F64: out[key] = v.value.f64; break;
      case AMQP_FIELD_KIND_UTF8:
      case AMQP_FIELD_KIND_BYTES: out[key] = bytes_str(v.value.bytes); break;
      default: break;  // arrays, nested tables, decimals: not ours
    }
  }
  return out;
}

Properties read_properties(const amqp_basic_properties_t* p) {
  Properties out;
  if (!p) {
    return out;
  }
  if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
    out.content_type = bytes_str(p->content_type);
  }
  if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
    out.correlation_id = bytes_str(p->correlation_id);
  }
  if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
    out.reply_to = bytes_str(p->reply_to);
  }
  if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
    out.message_id = bytes_str(p->message_id);
  }
  if (p->_flags & AMQP_BASIC_EXPIRATION_FLAG) {
    out.expiration = bytes_str(p->expiration);
  }
  if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) {
    out.delivery_mode = p->delivery_mode;
  }
  if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
    out.headers = read_table(p->headers);
  }
  return out;
}

// Keeps the entries alive while rabbitmq-c encodes them.
struct TableBuilder {
  std::vector<amqp_table_entry_t> entries;
  explicit TableBuilder(const Table& t) {
    entries.reserve(t.size());
    for (const auto& [k, v] : t) {
      amqp_table_entry_t e{};
      e.key = str_bytes(k);
      if (const auto* i = std::get_if<std::int64_t>(&v)) {
        e.value.kind = AMQP_FIELD_KIND_I64;
        e.value.value.i64 = *i;
      } else if (const auto* s = std::get_if<std::string>(&v)) {
        e.value.kind = AMQP_FIELD_KIND_UTF8;
        e.value.value.bytes = str_bytes(*s);
      } else if (const auto* b = std::get_if<bool>(&v)) {
        e.value.kind = AMQP_FIELD_KIND_BOOLEAN;
        e.value.value.boolean = *b ? 1 : 0;
      } else if (const auto* d = std::get_if<double>(&v)) {
        e.value.kind = AMQP_FIELD_KIND_F64;
        e.value.value.f64 = *d;
      }
      entries.push_back(e);
    }
  }
  amqp_table_t table() {
    amqp_table_t t;
    t.num_entries = static_cast<int>(entries.size());
    t.entries = entries.empty() ? nullptr : entries.data();
    return t;
  }
};

// rabbitmq-c announces only authentication_failure_close (and merges what
// we add): without consumer_cancel_notify the broker drops a consumer of a
// deleted queue without a word, and without connection.blocked it blocks us
// in silence during an alarm.
amqp_rpc_reply_t login(amqp_connection_state_t conn, const config::AmqpUrl& url, const Options& opts) {
  amqp_table_entry_t caps[2];
  caps[0].key = amqp_cstring_bytes("consumer_cancel_notify");
  caps[1].key = amqp_cstring_bytes("connection.blocked");
  for (auto& c : caps) {
    c.value.kind = AMQP_FIELD_KIND_BOOLEAN;
    c.value.value.boolean = 1;
  }
  amqp_table_entry_t props[2];
  props[0].key = amqp_cstring_bytes("capabilities");
  props[0].value.kind = AMQP_FIELD_KIND_TABLE;
  props[0].value.value.table = amqp_table_t{2, caps};
  props[1].key = amqp_cstring_bytes("connection_name");
  props[1].value.kind = AMQP_FIELD_KIND_UTF8;
  props[1].value.value.bytes = str_bytes(opts.connection_name);
  amqp_table_t client_props{opts.connection_name.empty() ? 1 : 2, props};
  return amqp_login_with_properties(conn, url.vhost.c_str(), 0, 131072, opts.heartbeat, &client_props,
                                    AMQP_SASL_METHOD_PLAIN, url.user.c_str(), url.password.c_str());
}

}  // namespace

std::int64_t table_int(const Table& t, const std::string& key, std::int64_t fallback) {
  auto it = t.find(key);
  if (it == t.end()) {
    return fallback;
  }
  if (const auto* i = std::get_if<std::int64_t>(&it->second)) {
    return *i;
  }
  if (const auto* s = std::get_if<std::string>(&it->second)) {
    char* end = nullptr;
    long long v = std::strtoll(s->c_str(), &end, 10);
    if (end && *end == '\0' && !s->empty()) {
      return v;
    }
  }
  return fallback;
}

std::string table_string(const Table& t, const std::string& key) {
  auto it = t.find(key);
  if (it == t.end()) {
    return {};
  }
  if (const auto* s = std::get_if<std::string>(&it->second)) {
    return *s;
  }
  if (const auto* i = std::get_if<std::int64_t>(&it->second)) {
    return std::to_string(*i);
  }
  return {};
}

std::optional<std::int64_t> consumer_timeout_of(const BrokerClose& c) {
  if (!c.channel || c.code != AMQP_PRECONDITION_FAILED ||
      c.text.find("delivery acknowledgement") == std::string::npos || c.text.find("timed out") == std::string::npos) {
    return std::nullopt;
  }
  static constexpr std::string_view k_used = "Timeout value used: ";
  auto at = c.text.find(k_used);
  if (at == std::string::npos) {
    return 0;
  }
  std::int64_t ms = 0;
  for (std::size_t i = at + k_used.size(); i < c.text.size() && c.text[i] >= '0' && c.text[i] <= '9'; ++i) {
    if (ms > 1'000'000'000'000) {
      return 0;  // no real timeout; keep clear of overflow
    }
    ms = ms * 10 + (c.text[i] - '0');
  }
  return ms;
}

Options options_from(const config::Rabbitmq& r) {
  Options o;
  o.url = r.amqp_url;
  o.ca_cert = r.ca_cert;
  o.verify_peer = r.verify_peer;
  o.heartbeat = r.heartbeat;
  return o;
}

Connection::Connection(const Options& opts) : m_s(std::make_unique<State>()) {
  m_redacted = config::redact_url(opts.url);
  auto url = config::parse_amqp_url(opts.url);
  m_heartbeat = opts.heartbeat;
  m_s->conn = amqp_new_connection();
  if (!m_s->conn) {
    throw Error(Exit::broker, "cannot allocate an AMQP connection");
  }
  m_s->socket = url.tls ? amqp_ssl_socket_new(m_s->conn) : amqp_tcp_socket_new(m_s->conn);
  if (!m_s->socket) {
    fail(std::string("cannot create a ") + (url.tls ? "TLS" : "TCP") + " socket");
  }
  if (url.tls) {
    amqp_ssl_socket_set_ssl_versions(m_s->socket, AMQP_TLSv1_2, AMQP_TLSvLATEST);
    std::string ca = opts.ca_cert.empty() ? system_ca_bundle() : opts.ca_cert;
    if (opts.verify_peer) {
      if (ca.empty()) {
        throw Error(Exit::broker, "amqps: no CA bundle to verify " + m_redacted + " with",
                    "set rabbitmq.ca_cert to the CA file that signed the broker's certificate");
      }
      if (amqp_ssl_socket_set_cacert(m_s->socket, ca.c_str()) != AMQP_STATUS_OK) {
        throw Error(Exit::broker, "amqps: cannot load the CA file " + ca,
                    "rabbitmq.ca_cert must name a readable PEM file");
      }
    }
    amqp_ssl_socket_set_verify_peer(m_s->socket, opts.verify_peer ? 1 : 0);
    amqp_ssl_socket_set_verify_hostname(m_s->socket, opts.verify_peer ? 1 : 0);
  }
  timeval tv = to_timeval(opts.timeout);
  int rc = amqp_socket_open_noblock(m_s->socket, url.host.c_str(), url.port, &tv);
  if (rc != AMQP_STATUS_OK) {
    fail(std::string("cannot connect: ") + amqp_error_string2(rc));
  }
  amqp_set_handshake_timeout(m_s->conn, &tv);
  amqp_set_rpc_timeout(m_s->conn, &tv);

  amqp_rpc_reply_t r = login(m_s->conn, url, opts);
  if (r.reply_type != AMQP_RESPONSE_NORMAL) {
    std::string why;
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
      auto* c = static_cast<amqp_connection_close_t*>(r.reply.decoded);
      why = std::to_string(c->reply_code) + " " + bytes_str(c->reply_text);
    } else if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
      why = amqp_error_string2(r.library_error);
    } else {
      why = "unexpected reply";
    }
    fail("login to vhost '" + url.vhost + "' as '" + url.user + "' refused or failed: " + why);
  }
  amqp_channel_open(m_s->conn, k_channel);
  check_rpc("opening a channel");
  m_last_recv = Clock::now();
}

Connection::~Connection() {
  if (!m_s || !m_s->conn) {
    return;
  }
  if (!m_broken) {
    timeval tv = to_timeval(std::chrono::milliseconds(2000));
    amqp_set_rpc_timeout(m_s->conn, &tv);
    amqp_channel_close(m_s->conn, k_channel, AMQP_REPLY_SUCCESS);
    amqp_connection_close(m_s->conn, AMQP_REPLY_SUCCESS);
  }
  amqp_destroy_connection(m_s->conn);
}

void Connection::fail(const std::string& what) {
  m_broken = true;
  throw Error(Exit::broker, "broker " + m_redacted + ": " + what, k_hint);
}

void Connection::check_rpc(const char* what, std::uint16_t channel) {
  amqp_rpc_reply_t r = amqp_get_rpc_reply(m_s->conn);
  switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return;
    case AMQP_RESPONSE_NONE: fail(std::string(what) + ": no reply");
    case AMQP_RESPONSE_LIBRARY_EXCEPTION: fail(std::string(what) + ": " + amqp_error_string2(r.library_error));
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        auto* c = static_cast<amqp_connection_close_t*>(r.reply.decoded);
        amqp_connection_close_ok_t ok{};
        amqp_send_method(m_s->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        fail(std::string(what) + ": broker closed the connection: " + std::to_string(c->reply_code) + " " +
             bytes_str(c->reply_text));
      }
      if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        auto* c = static_cast<amqp_channel_close_t*>(r.reply.decoded);
        amqp_channel_close_ok_t ok{};
        amqp_send_method(m_s->conn, channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        fail(std::string(what) + ": broker closed the channel: " + std::to_string(c->reply_code) + " " +
             bytes_str(c->reply_text));
      }
      fail(std::string(what) + ": unexpected server method");
  }
  fail(std::string(what) + ": unknown reply");
}

int Connection::fd() const { return amqp_get_sockfd(m_s->conn); }

bool Connection::buffered() const { return amqp_frames_enqueued(m_s->conn) || amqp_data_in_buffer(m_s->conn); }

std::string Connection::declare_queue(const std::string& name, bool durable, bool exclusive, bool auto_delete) {
  auto* ok =
      amqp_queue_declare(m_s->conn, k_channel, name.empty() ? amqp_empty_bytes : amqp_cstring_bytes(name.c_str()), 0,
                         durable ? 1 : 0, exclusive ? 1 : 0, auto_delete ? 1 : 0, amqp_empty_table);
  check_rpc(("declaring queue '" + name + "'").c_str());
  return ok ? bytes_str(ok->queue) : name;
}

void Connection::declare_queue_async(const std::string& name, bool durable, bool auto_delete, bool reply) {
  amqp_queue_declare_t req{};
  req.queue = str_bytes(name);
  req.durable = durable ? 1 : 0;
  req.auto_delete = auto_delete ? 1 : 0;
  req.nowait = reply ? 0 : 1;
  req.arguments = amqp_empty_table;
  int rc = amqp_send_method(m_s->conn, k_channel, AMQP_QUEUE_DECLARE_METHOD, &req);
  if (rc != AMQP_STATUS_OK) {
    fail("declaring queue '" + name + "': " + amqp_error_string2(rc));
  }
}

std::uint32_t Connection::queue_depth(const std::string& name) {
  auto* ok = amqp_queue_declare(m_s->conn, k_channel, amqp_cstring_bytes(name.c_str()), 1, 0, 0, 0, amqp_empty_table);
  check_rpc(("inspecting queue '" + name + "'").c_str());
  return ok ? ok->message_count : 0;
}

std::optional<Connection::QueueInfo> Connection::queue_info(const std::string& name) {
  auto* ok = amqp_queue_declare(m_s->conn, k_channel, amqp_cstring_bytes(name.c_str()), 1, 0, 0, 0, amqp_empty_table);
  auto reply = amqp_get_rpc_reply(m_s->conn);
  if (reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
      static_cast<amqp_channel_close_t*>(reply.reply.decoded)->reply_code == AMQP_NOT_FOUND) {
    amqp_channel_close_ok_t close_ok{};
    amqp_send_method(m_s->conn, k_channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok);
    // The same channel again, so a caller that asks often (the autoalloc
    // controller at zero, before anything was published) keeps one connection.
    amqp_channel_open(m_s->conn, k_channel);
    check_rpc("reopening the channel after a passive declare");
    return std::nullopt;
  }
  check_rpc(("inspecting queue '" + name + "'").c_str());
  return ok ? std::optional<QueueInfo>(QueueInfo{ok->message_count, ok->consumer_count}) : std::nullopt;
}

std::optional<Delivery> Connection::get(const std::string& queue) {
  amqp_basic_get(m_s->conn, k_channel, amqp_cstring_bytes(queue.c_str()), 0);
  check_rpc(("taking a message from '" + queue + "'").c_str());
  auto reply = amqp_get_rpc_reply(m_s->conn);
  if (reply.reply.id != AMQP_BASIC_GET_OK_METHOD) {
    return std::nullopt;  // basic.get-empty
  }
  const auto* ok = static_cast<amqp_basic_get_ok_t*>(reply.reply.decoded);
  Delivery d;
  d.channel = k_channel;
  d.tag = ok->delivery_tag;
  d.redelivered = ok->redelivered != 0;
  d.exchange = bytes_str(ok->exchange);
  d.routing_key = bytes_str(ok->routing_key);
  amqp_message_t msg{};
  auto read = amqp_read_message(m_s->conn, k_channel, &msg, 0);
  if (read.reply_type != AMQP_RESPONSE_NORMAL) {
    fail("reading a message taken from '" + queue + "'");
  }
  d.body = bytes_str(msg.body);
  d.body_size = d.body.size();
  d.props = read_properties(&msg.properties);
  amqp_destroy_message(&msg);
  amqp_maybe_release_buffers(m_s->conn);
  return d;
}

void Connection::open_channel(std::uint16_t channel) {
  amqp_channel_open(m_s->conn, channel);
  check_rpc(("opening channel " + std::to_string(channel)).c_str(), channel);
}

void Connection::qos(std::uint16_t prefetch, bool global, std::uint16_t channel) {
  amqp_basic_qos(m_s->conn, channel, 0, prefetch, global ? 1 : 0);
  check_rpc("setting the prefetch count", channel);
}

std::string Connection::consume(const std::string& queue, bool no_ack, bool exclusive) {
  ConsumeArgs a;
  a.no_ack = no_ack;
  a.exclusive = exclusive;
  return consume(queue, a);
}

std::string Connection::consume(const std::string& queue, const ConsumeArgs& a) {
  amqp_table_entry_t prio{};
  prio.key = amqp_cstring_bytes("x-priority");
  prio.value.kind = AMQP_FIELD_KIND_I32;
  prio.value.value.i32 = a.priority.value_or(0);
  amqp_table_t args{a.priority ? 1 : 0, &prio};
  std::string what = "consuming from '" + queue + "'";
  if (a.nowait) {
    amqp_basic_consume_t req{};
    req.queue = str_bytes(queue);
    req.consumer_tag = str_bytes(a.tag);
    req.no_ack = a.no_ack ? 1 : 0;
    req.exclusive = a.exclusive ? 1 : 0;
    req.nowait = 1;
    req.arguments = args;
    int rc = amqp_send_method(m_s->conn, a.channel, AMQP_BASIC_CONSUME_METHOD, &req);
    if (rc != AMQP_STATUS_OK) {
      fail(what + ": " + amqp_error_string2(rc));
    }
    return a.tag;
  }
  auto* ok = amqp_basic_consume(m_s->conn, a.channel, amqp_cstring_bytes(queue.c_str()),
                                a.tag.empty() ? amqp_empty_bytes : str_bytes(a.tag), 0, a.no_ack ? 1 : 0,
                                a.exclusive ? 1 : 0, args);
  check_rpc(what.c_str(), a.channel);
  return ok ? bytes_str(ok->consumer_tag) : a.tag;
}

void Connection::confirm_select() {
  amqp_confirm_select(m_s->conn, k_channel);
  check_rpc("enabling publisher confirms");
  m_confirms = true;
}

void Connection::declare_exchange(const std::string& name, const std::string& type) {
  amqp_exchange_declare(m_s->conn, k_channel, amqp_cstring_bytes(name.c_str()), amqp_cstring_bytes(type.c_str()), 0,
                        /*durable=*/1, /*auto_delete=*/0, /*internal=*/0, amqp_empty_table);
  check_rpc(("declaring exchange '" + name + "'").c_str());
}

void Connection::bind_queue(const std::string& queue, const std::string& exchange, const std::string& routing_key) {
  amqp_queue_bind(m_s->conn, k_channel, amqp_cstring_bytes(queue.c_str()), amqp_cstring_bytes(exchange.c_str()),
                  amqp_cstring_bytes(routing_key.c_str()), amqp_empty_table);
  check_rpc(("binding queue '" + queue + "' to '" + exchange + "'").c_str());
}

void Connection::declare_exchange_async(const std::string& name, const std::string& type) {
  amqp_exchange_declare_t req{};
  req.exchange = str_bytes(name);
  req.type = str_bytes(type);
  req.durable = 1;
  req.nowait = 1;
  req.arguments = amqp_empty_table;
  int rc = amqp_send_method(m_s->conn, k_channel, AMQP_EXCHANGE_DECLARE_METHOD, &req);
  if (rc != AMQP_STATUS_OK) {
    fail("declaring exchange '" + name + "': " + amqp_error_string2(rc));
  }
}

void Connection::bind_queue_async(const std::string& queue, const std::string& exchange) {
  amqp_queue_bind_t req{};
  req.queue = str_bytes(queue);
  req.exchange = str_bytes(exchange);
  req.routing_key = amqp_empty_bytes;
  req.nowait = 1;
  req.arguments = amqp_empty_table;
  int rc = amqp_send_method(m_s->conn, k_channel, AMQP_QUEUE_BIND_METHOD, &req);
  if (rc != AMQP_STATUS_OK) {
    fail("binding queue '" + queue + "' to '" + exchange + "': " + amqp_error_string2(rc));
  }
}

void Connection::qos_async(std::uint16_t prefetch, bool global, std::uint16_t channel) {
  amqp_basic_qos_t req{};
  req.prefetch_size = 0;
  req.prefetch_count = prefetch;
  req.global = global ? 1 : 0;
  int rc = amqp_send_method(m_s->conn, channel, AMQP_BASIC_QOS_METHOD, &req);
  if (rc != AMQP_STATUS_OK) {
    fail(std::string("setting the prefetch count: ") + amqp_error_string2(rc));
  }
}

void Connection::cancel_async(const std::string& consumer_tag, std::uint16_t channel) {
  amqp_basic_cancel_t req{};
  req.consumer_tag = str_bytes(consumer_tag);
  req.nowait = 0;
  int rc = amqp_send_method(m_s->conn, channel, AMQP_BASIC_CANCEL_METHOD, &req);
  if (rc != AMQP_STATUS_OK) {
    fail(std::string("cancelling the consumer: ") + amqp_error_string2(rc));
  }
}

void Connection::ack(std::uint64_t tag, bool multiple, std::uint16_t channel) {
  int rc = amqp_basic_ack(m_s->conn, channel, tag, multiple ? 1 : 0);
  if (rc != AMQP_STATUS_OK) {
    fail(std::string("ack: ") + amqp_error_string2(rc));
  }
}

void Connection::reject(std::uint64_t tag, bool requeue, std::uint16_t channel) {
  int rc = amqp_basic_reject(m_s->conn, channel, tag, requeue ? 1 : 0);
  if (rc != AMQP_STATUS_OK) {
    fail(std::string("reject: ") + amqp_error_string2(rc));
  }
}

std::uint64_t Connection::publish(const std::string& exchange, const std::string& routing_key, std::string_view body,
                                  const Properties& props) {
  amqp_basic_properties_t p{};
  p._flags = 0;
  if (!props.content_type.empty()) {
    p._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    p.content_type = str_bytes(props.content_type);
  }
  if (props.delivery_mode) {
    p._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.delivery_mode = props.delivery_mode;
  }
  if (!props.correlation_id.empty()) {
    p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
    p.correlation_id = str_bytes(props.correlation_id);
  }
  if (!props.reply_to.empty()) {
    p._flags |= AMQP_BASIC_REPLY_TO_FLAG;
    p.reply_to = str_bytes(props.reply_to);
  }
  if (!props.message_id.empty()) {
    p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
    p.message_id = str_bytes(props.message_id);
  }
  if (!props.expiration.empty()) {
    p._flags |= AMQP_BASIC_EXPIRATION_FLAG;
    p.expiration = str_bytes(props.expiration);
  }
  TableBuilder headers(props.headers);
  if (!props.headers.empty()) {
    p._flags |= AMQP_BASIC_HEADERS_FLAG;
    p.headers = headers.table();
  }
  amqp_bytes_t b;
  b.len = body.size();
  b.bytes = const_cast<char*>(body.data());
  int rc = amqp_basic_publish(m_s->conn, k_channel, amqp_cstring_bytes(exchange.c_str()),
                              amqp_cstring_bytes(routing_key.c_str()), 0, 0, &p, b);
  if (rc != AMQP_STATUS_OK) {
    fail("publishing to '" + routing_key + "': " + amqp_error_string2(rc));
  }
  if (!m_confirms) {
    return 0;
  }
  std::uint64_t seq = m_next_seq++;
  m_unconfirmed.insert(seq);
  return seq;
}

void Connection::on_method(std::uint16_t channel, std::uint32_t id, void* decoded) {
  switch (id) {
    case AMQP_BASIC_DELIVER_METHOD: return begin_delivery(channel, decoded);
    case AMQP_BASIC_RETURN_METHOD: {
      auto* r = static_cast<amqp_basic_return_t*>(decoded);
      spdlog::warn("broker returned a message published to '{}': {} {}", bytes_str(r->routing_key), r->reply_code,
                   bytes_str(r->reply_text));
      m_partial = Delivery{};
      m_content = Content::discard;
      m_body_size = 0;
      return;
    }
    case AMQP_BASIC_ACK_METHOD: {
      auto* a = static_cast<amqp_basic_ack_t*>(decoded);
      return on_confirm(a->delivery_tag, a->multiple != 0, true);
    }
    case AMQP_BASIC_NACK_METHOD: {
      auto* n = static_cast<amqp_basic_nack_t*>(decoded);
      return on_confirm(n->delivery_tag, n->multiple != 0, false);
    }
    case AMQP_QUEUE_DECLARE_OK_METHOD: {
      auto* q = static_cast<amqp_queue_declare_ok_t*>(decoded);
      if (m_declared_in.size() < 4096) {  // bounded: a caller that never takes them
        m_declared_in.push_back({bytes_str(q->queue), q->message_count, q->consumer_count});
      }
      return;
    }
    case AMQP_BASIC_CANCEL_METHOD: {
      auto* c = static_cast<amqp_basic_cancel_t*>(decoded);
      m_cancelled.push_back({channel, bytes_str(c->consumer_tag)});
      return;
    }
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD: on_close(channel, id, decoded);
    case AMQP_CONNECTION_BLOCKED_METHOD:
    case AMQP_CONNECTION_UNBLOCKED_METHOD: return on_blocked(id, decoded);
    default: return;  // qos-ok, cancel-ok, ... of async requests
  }
}

// basic.deliver: a delivery's header and body frames follow.
void Connection::begin_delivery(std::uint16_t channel, const void* decoded) {
  const auto* d = static_cast<const amqp_basic_deliver_t*>(decoded);
  m_partial = Delivery{};
  m_partial.channel = channel;
  m_partial.tag = d->delivery_tag;
  m_partial.redelivered = d->redelivered != 0;
  m_partial.exchange = bytes_str(d->exchange);
  m_partial.routing_key = bytes_str(d->routing_key);
  m_content = Content::delivery;
  m_body_size = 0;
}

// A publisher confirm (ack or nack) of one sequence number, or of every
// unconfirmed one up to it.
void Connection::on_confirm(std::uint64_t tag, bool multiple, bool ack) {
  if (multiple) {
    auto end = m_unconfirmed.upper_bound(tag);
    for (auto it = m_unconfirmed.begin(); it != end; ++it) {
      m_confirms_in.push_back({*it, ack});
    }
    m_unconfirmed.erase(m_unconfirmed.begin(), end);
  } else if (m_unconfirmed.erase(tag)) {
    m_confirms_in.push_back({tag, ack});
  }
}

// channel.close or connection.close from the broker: answered, kept for
// closed_by_broker(), and the connection fails.
void Connection::on_close(std::uint16_t channel, std::uint32_t id, const void* decoded) {
  if (id == AMQP_CHANNEL_CLOSE_METHOD) {
    const auto* c = static_cast<const amqp_channel_close_t*>(decoded);
    m_closed = BrokerClose{true, c->reply_code, bytes_str(c->reply_text)};
    amqp_channel_close_ok_t ok{};
    amqp_send_method(m_s->conn, channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
    fail("broker closed channel " + std::to_string(channel) + ": " + std::to_string(c->reply_code) + " " +
         m_closed->text);
  }
  const auto* c = static_cast<const amqp_connection_close_t*>(decoded);
  m_closed = BrokerClose{false, c->reply_code, bytes_str(c->reply_text)};
  amqp_connection_close_ok_t ok{};
  amqp_send_method(m_s->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
  fail("broker closed the connection: " + std::to_string(c->reply_code) + " " + m_closed->text);
}

// connection.blocked / connection.unblocked (the broker's resource alarms).
void Connection::on_blocked(std::uint32_t id, const void* decoded) {
  if (id == AMQP_CONNECTION_UNBLOCKED_METHOD) {
    m_blocked = false;
    m_blocked_reason.clear();
    spdlog::info("broker {} unblocked this connection", m_redacted);
    return;
  }
  const auto* b = static_cast<const amqp_connection_blocked_t*>(decoded);
  m_blocked = true;
  m_blocked_reason = bytes_str(b->reason);
  if (m_blocked_reason.empty()) {
    m_blocked_reason = "no reason given";
  }
  spdlog::warn("broker {} blocks this connection: {}", m_redacted, m_blocked_reason);
}

void Connection::on_header(std::uint64_t body_size, const void* decoded) {
  if (m_content == Content::none) {
    return;
  }
  m_body_size = body_size;
  if (m_content == Content::delivery) {
    m_partial.props = read_properties(static_cast<const amqp_basic_properties_t*>(decoded));
    m_partial.body_size = body_size;
    if (m_max_body > 0 && body_size > m_max_body) {
      // Never buffered: any publisher could otherwise pin prefetch x the
      // broker's maximum message size in every rank.
      m_partial.oversized = true;
      m_content = Content::oversized;
    } else {
      m_partial.body.reserve(body_size);
    }
  }
  if (m_body_size == 0) {
    finish_content();
  }
}

void Connection::on_body(const void* bytes, std::size_t len) {
  if (m_content == Content::none) {
    return;
  }
  if (m_content == Content::delivery) {
    m_partial.body.append(static_cast<const char*>(bytes), len);
  }
  m_body_size -= std::min<std::uint64_t>(m_body_size, len);
  if (m_body_size == 0) {
    finish_content();
  }
}

void Connection::finish_content() {
  if (m_content == Content::delivery || m_content == Content::oversized) {
    m_deliveries.push_back(std::move(m_partial));
  }
  m_partial = Delivery{};
  m_content = Content::none;
  m_body_size = 0;
}

void Connection::pump(bool readable) {
  if (m_broken) {
    fail("connection already lost");
  }
  auto now = Clock::now();
  if (readable) {
    m_last_recv = now;
  }
  // One read from the socket (the first call), then only what that read
  // buffered: poll() reports the rest. A second read would only find EAGAIN,
  // and cost rabbitmq-c a recv() and a poll() per message.
  for (bool first = true; first || buffered(); first = false) {
    amqp_frame_t frame;
    timeval tv{0, 0};
    int rc = amqp_simple_wait_frame_noblock(m_s->conn, &frame, &tv);
    if (rc == AMQP_STATUS_TIMEOUT) {
      break;
    }
    if (rc != AMQP_STATUS_OK) {
      fail(std::string("connection lost: ") + amqp_error_string2(rc));
    }
    m_last_recv = now;
    switch (frame.frame_type) {
      case AMQP_FRAME_METHOD: on_method(frame.channel, frame.payload.method.id, frame.payload.method.decoded); break;
      case AMQP_FRAME_HEADER: on_header(frame.payload.properties.body_size, frame.payload.properties.decoded); break;
      case AMQP_FRAME_BODY: on_body(frame.payload.body_fragment.bytes, frame.payload.body_fragment.len); break;
      default: break;
    }
    amqp_maybe_release_buffers(m_s->conn);
  }
  // rabbitmq-c does not notice a silent broker when only polled with a zero
  // timeout: count two missed heartbeats ourselves (the broker sends one
  // every heartbeat/2 s).
  if (m_heartbeat > 0 && now - m_last_recv > std::chrono::seconds(2 * m_heartbeat)) {
    fail("no heartbeat from the broker for " + std::to_string(2 * m_heartbeat) + " s");
  }
}

bool Connection::next_delivery(Delivery& out) {
  if (m_deliveries.empty()) {
    return false;
  }
  out = std::move(m_deliveries.front());
  m_deliveries.pop_front();
  return true;
}

std::vector<Confirm> Connection::take_confirms() { return std::exchange(m_confirms_in, {}); }

void Connection::wait(Clock::time_point deadline) {
  std::size_t deliveries = m_deliveries.size();
  std::size_t confirms = m_confirms_in.size();
  bool readable = false;
  while (true) {
    pump(readable);
    if (m_deliveries.size() != deliveries || m_confirms_in.size() != confirms) {
      return;
    }
    auto now = Clock::now();
    if (now >= deadline) {
      return;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    if (m_heartbeat > 0) {
      left = std::min<long long>(left, m_heartbeat * 500LL);
    }
    pollfd p{fd(), POLLIN, 0};
    int n = buffered() ? 0 : ::poll(&p, 1, static_cast<int>(left));
    readable = n > 0;
  }
}

bool Connection::wait_confirms(Clock::time_point deadline) {
  while (!m_unconfirmed.empty()) {
    for (const auto& c : take_confirms()) {
      if (!c.ack) {
        fail("the broker refused (nacked) a published message");
      }
    }
    if (m_unconfirmed.empty()) {
      break;
    }
    if (Clock::now() >= deadline) {
      return false;
    }
    wait(deadline);
  }
  for (const auto& c : take_confirms()) {
    if (!c.ack) {
      fail("the broker refused (nacked) a published message");
    }
  }
  return true;
}

}  // namespace lhpc::amqp
