// Benchmark helpers for bench/dispatch.sh (never a test):
//   dispatch-bench publish --count N [--rate R] [--queue Q]
//       N single-call no-op send_task messages, persistent, with publisher
//       confirms, each stamped with x-lithops-hpc-sent-ns (wall clock);
//       --rate paces them (messages/s), else as fast as the broker takes them;
//       --sleep S makes each call print LHPC-BUSY-START and sleep S seconds
//       in the fake Lithops (bench/dispatch-busy.sh: every slot busy, a
//       backlog waiting); --calls C puts C calls in each message (the real
//       client's batches of worker_processes calls); --record-dir D makes
//       each call write its start and end there (bench/tail.sh).
//   dispatch-bench raw --count N --prefetch P --latency-log FILE [--queue Q]
//       the baseline: a plain rabbitmq-c consumer (basic.qos P, one ack per
//       message right after delivery) writing "sent_ns ack_ns" per message;
//       --work-us W spins W µs before each ack: a consumer that does the
//       work itself, in one thread (how much of the gap is the work).
// The broker URL comes from $AMQP_URL, never argv.
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "amqp/connection.h"
#include "config/config.h"
#include "dispatch/protocol.h"

using namespace lhpc;

namespace {

std::int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string arg(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 2; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) {
      return argv[i + 1];
    }
  }
  return fallback;
}

std::string url() {
  const char* u = std::getenv("AMQP_URL");
  if (!u || !*u) {
    std::fprintf(stderr, "dispatch-bench: set AMQP_URL\n");
    std::exit(2);
  }
  return u;
}

dispatch::Json noop_payload(int i) {
  char key[32];
  std::snprintf(key, sizeof key, "bench-%06d", i);
  return {{"job_key", key},
          {"executor_id", "bench"},
          {"call_ids", {"00000"}},
          {"data_byte_ranges", {{0, 9}}},
          {"total_calls", 1},
          {"worker_processes", 1},
          {"log_level", "WARNING"},
          {"execution_timeout", 60},
          {"config", {{"lithops", {{"backend", "singularity"}}}}},
          {"lhpc_test", dispatch::Json::object()}};
}

int publish(int argc, char** argv) {
  int count = std::stoi(arg(argc, argv, "--count", "20000"));
  double rate = std::stod(arg(argc, argv, "--rate", "0"));
  std::string queue = arg(argc, argv, "--queue", "task_queue");
  double sleep_s = std::stod(arg(argc, argv, "--sleep", "0"));
  int calls = std::max(1, std::stoi(arg(argc, argv, "--calls", "1")));
  std::string record_dir = arg(argc, argv, "--record-dir", "");
  // "a,b": message i names runtime i % 2 (interleaved); empty: no runtime_name.
  std::vector<std::string> runtimes;
  for (std::string rest = arg(argc, argv, "--runtimes", ""); !rest.empty();) {
    auto comma = rest.find(',');
    runtimes.push_back(rest.substr(0, comma));
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  }
  amqp::Options o;
  o.url = url();
  o.connection_name = "dispatch-bench publisher";
  amqp::Connection c(o);
  c.declare_queue(queue, true);
  c.confirm_select();
  auto start = std::chrono::steady_clock::now();
  // Bodies prepared up front: the publisher must not be the bottleneck.
  std::vector<std::string> bodies;
  bodies.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    auto payload = noop_payload(i);
    if (!runtimes.empty()) {
      payload["runtime_name"] = runtimes[static_cast<std::size_t>(i) % runtimes.size()];
    }
    if (calls > 1) {
      payload["call_ids"] = dispatch::Json::array();
      payload["data_byte_ranges"] = dispatch::Json::array();
      for (int k = 0; k < calls; ++k) {
        char id[16];
        std::snprintf(id, sizeof id, "%05d", k);
        payload["call_ids"].push_back(id);
        payload["data_byte_ranges"].push_back({0, 9});
      }
      payload["total_calls"] = calls;
      payload["worker_processes"] = calls;
    }
    if (!record_dir.empty()) {
      payload["lhpc_test"]["record_dir"] = record_dir;
    }
    if (sleep_s > 0) {
      payload["lhpc_test"]["sleep"] = sleep_s;
      payload["lhpc_test"]["print"] = "LHPC-BUSY-START";
    }
    bodies.push_back(dispatch::encode(dispatch::Action::send_task, payload));
  }
  for (int i = 0; i < count; ++i) {
    if (rate > 0) {
      auto due = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                             std::chrono::duration<double>(i / rate));
      std::this_thread::sleep_until(due);
    }
    amqp::Properties p;
    p.delivery_mode = 2;
    p.headers[dispatch::k_hdr_sent_ns] = wall_ns();
    c.publish("", queue, bodies[static_cast<std::size_t>(i)], p);
    // Keep at most 500 unconfirmed, as a careful client would.
    if (c.unconfirmed() >= 500) {
      c.pump();
      c.take_confirms();
      while (c.unconfirmed() >= 500) {
        c.wait(std::chrono::steady_clock::now() + std::chrono::seconds(5));
        c.take_confirms();
      }
    }
  }
  if (!c.wait_confirms(std::chrono::steady_clock::now() + std::chrono::seconds(60))) {
    std::fprintf(stderr, "dispatch-bench: confirms missing after 60 s\n");
    return 1;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "published %d in %.2f s (%.0f msg/s)\n", count, secs, count / secs);
  return 0;
}

int die_amqp(amqp_rpc_reply_t r, const char* what) {
  if (r.reply_type == AMQP_RESPONSE_NORMAL) {
    return 0;
  }
  std::fprintf(stderr, "dispatch-bench raw: %s failed (%d)\n", what, static_cast<int>(r.reply_type));
  std::exit(1);
}

int raw(int argc, char** argv) {
  int count = std::stoi(arg(argc, argv, "--count", "20000"));
  int prefetch = std::stoi(arg(argc, argv, "--prefetch", "2"));
  std::string log = arg(argc, argv, "--latency-log", "");
  std::string queue = arg(argc, argv, "--queue", "task_queue");
  const auto work = std::chrono::microseconds(std::stoi(arg(argc, argv, "--work-us", "0")));
  auto u = config::parse_amqp_url(url());
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t* sock = amqp_tcp_socket_new(conn);
  if (amqp_socket_open(sock, u.host.c_str(), u.port) != AMQP_STATUS_OK) {
    std::fprintf(stderr, "dispatch-bench raw: cannot connect\n");
    return 1;
  }
  die_amqp(amqp_login(conn, u.vhost.c_str(), 0, 131072, 60, AMQP_SASL_METHOD_PLAIN, u.user.c_str(), u.password.c_str()),
           "login");
  amqp_channel_open(conn, 1);
  die_amqp(amqp_get_rpc_reply(conn), "channel.open");
  amqp_queue_declare(conn, 1, amqp_cstring_bytes(queue.c_str()), 0, 1, 0, 0, amqp_empty_table);
  die_amqp(amqp_get_rpc_reply(conn), "queue.declare");
  // --global: a per-channel limit, as the dispatcher uses (it changes the limit while consuming).
  bool global = arg(argc, argv, "--global", "0") == "1";
  amqp_basic_qos(conn, 1, 0, static_cast<uint16_t>(prefetch), global ? 1 : 0);
  die_amqp(amqp_get_rpc_reply(conn), "basic.qos");
  amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue.c_str()), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
  die_amqp(amqp_get_rpc_reply(conn), "basic.consume");
  std::vector<std::pair<std::int64_t, std::int64_t>> lat;
  lat.reserve(static_cast<std::size_t>(count));
  const std::string hdr = dispatch::k_hdr_sent_ns;
  while (static_cast<int>(lat.size()) < count) {
    amqp_envelope_t env;
    amqp_maybe_release_buffers(conn);
    timeval tv{60, 0};
    amqp_rpc_reply_t r = amqp_consume_message(conn, &env, &tv, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
      std::fprintf(stderr, "dispatch-bench raw: consume failed after %zu messages\n", lat.size());
      return 1;
    }
    std::int64_t sent = 0;
    const auto& props = env.message.properties;
    if (props._flags & AMQP_BASIC_HEADERS_FLAG) {
      for (int i = 0; i < props.headers.num_entries; ++i) {
        const auto& e = props.headers.entries[i];
        if (e.key.len == hdr.size() && std::memcmp(e.key.bytes, hdr.data(), hdr.size()) == 0 &&
            e.value.kind == AMQP_FIELD_KIND_I64) {
          sent = e.value.value.i64;
        }
      }
    }
    for (auto until = std::chrono::steady_clock::now() + work; std::chrono::steady_clock::now() < until;) {
    }
    amqp_basic_ack(conn, 1, env.delivery_tag, 0);
    lat.emplace_back(sent, wall_ns());
    amqp_destroy_envelope(&env);
  }
  amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
  amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
  amqp_destroy_connection(conn);
  if (!log.empty()) {
    std::ofstream out(log);
    for (const auto& [s, a] : lat) {
      out << s << ' ' << a << '\n';
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "publish") {
      return publish(argc, argv);
    }
    if (cmd == "raw") {
      return raw(argc, argv);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dispatch-bench: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: dispatch-bench publish|raw ... (see bench/dispatch.sh)\n");
  return 2;
}
