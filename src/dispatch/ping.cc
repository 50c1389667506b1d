#include "dispatch/ping.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>

#include "amqp/connection.h"
#include "dispatch/protocol.h"
#include "util/error.h"

namespace lhpc::dispatch {

namespace {

using Clock = std::chrono::steady_clock;

double percentile(std::vector<double> v, double p) {
  if (v.empty()) {
    return 0;
  }
  std::sort(v.begin(), v.end());
  auto idx = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size()))) - 1;
  return v[std::min(idx, v.size() - 1)];
}

std::string random_hex(int n) {
  std::random_device rd;
  std::string s;
  const char* digits = "0123456789abcdef";
  for (int i = 0; i < n; ++i) {
    s += digits[rd() % 16];
  }
  return s;
}

}  // namespace

int run_ping(const config::Config& cfg, const PingOptions& o, std::ostream& out) {
  if (o.count < 1 || o.concurrency < 1 || !(o.timeout > 0) || o.expect_ranks < 0) {
    throw Error(Exit::usage, "ping: --count and --concurrency must be at least 1, --timeout above 0",
                "e.g. lithops-hpc ping --count 100 --concurrency 8 --timeout 10");
  }
  config::require_amqp_url(cfg);
  amqp::Options opts = amqp::options_from(cfg.rabbitmq);
  opts.connection_name = "lithops-hpc ping";
  amqp::Connection c(opts);
  const auto& queue = cfg.rabbitmq.queue;
  c.declare_queue(queue, true);  // as the Lithops client does: durable, no arguments
  std::string reply_queue = c.declare_queue("", false, true, true);
  c.consume(reply_queue, /*no_ack=*/true, /*exclusive=*/true);

  auto timeout = std::chrono::milliseconds(static_cast<long long>(o.timeout * 1000));
  std::string prefix = "lhpc-ping-" + random_hex(12) + "-";
  struct Sent {
    int seq;
    Clock::time_point at;
  };
  std::map<std::string, Sent> inflight;
  struct Rank {
    std::string node;
    std::vector<double> ms;
  };
  std::map<int, Rank> ranks;
  int next = 0, answered = 0, lost = 0;
  auto start = Clock::now();

  while (answered + lost < o.count) {
    while (static_cast<int>(inflight.size()) < o.concurrency && next < o.count) {
      double unix_now =
          std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
      amqp::Properties p;
      p.reply_to = reply_queue;
      p.correlation_id = prefix + std::to_string(next);
      p.delivery_mode = 1;
      // A ping nobody takes must not linger in the task queue.
      p.expiration = std::to_string(timeout.count());
      c.publish("", queue, encode(Action::ping, {{"seq", next}, {"sent", unix_now}}), p);
      inflight[p.correlation_id] = {next, Clock::now()};
      ++next;
    }
    auto oldest = Clock::now();  // inflight is never empty here: the loop above just filled it
    for (const auto& [k, s] : inflight) {
      oldest = std::min(oldest, s.at);
    }
    c.wait(oldest + timeout);
    amqp::Delivery d;
    while (c.next_delivery(d)) {
      auto it = inflight.find(d.props.correlation_id);
      if (it == inflight.end()) {
        continue;  // a late answer to a ping already counted lost
      }
      double ms = std::chrono::duration<double, std::milli>(Clock::now() - it->second.at).count();
      inflight.erase(it);
      ++answered;
      Json reply = Json::parse(d.body, nullptr, false);
      int rank = -1;
      std::string node = "?";
      if (reply.is_object()) {
        rank = static_cast<int>(json_int(reply, "rank", -1));
        node = json_string(reply, "node", "?");
      }
      auto& r = ranks[rank];
      r.node = node;
      r.ms.push_back(ms);
    }
    auto now = Clock::now();
    for (auto it = inflight.begin(); it != inflight.end();) {
      if (now - it->second.at >= timeout) {
        ++lost;
        it = inflight.erase(it);
      } else {
        ++it;
      }
    }
  }
  double secs = std::chrono::duration<double>(Clock::now() - start).count();

  for (const auto& [rank, r] : ranks) {
    out << fmt::format("rank {} node {}: {} replies, p50 {:.2f} ms, p99 {:.2f} ms\n", rank, r.node, r.ms.size(),
                       percentile(r.ms, 50), percentile(r.ms, 99));
  }
  out << fmt::format("{}/{} pings answered by {} rank{} in {:.2f} s: {:.1f} pings/s\n", answered, o.count,
                     ranks.size(), ranks.size() == 1 ? "" : "s", secs, secs > 0 ? answered / secs : 0.0);
  if (answered == 0) {
    out << fmt::format("no reply within {} s: is a deployment consuming '{}' on {}?\n", o.timeout, queue,
                       c.redacted_url());
    return static_cast<int>(Exit::failure);
  }
  if (lost > 0) {
    out << fmt::format("{} ping{} got no reply within {} s\n", lost, lost == 1 ? "" : "s", o.timeout);
    return static_cast<int>(Exit::failure);
  }
  if (static_cast<int>(ranks.size()) < o.expect_ranks) {
    out << fmt::format("only {} of the {} expected ranks answered\n", ranks.size(), o.expect_ranks);
    return static_cast<int>(Exit::failure);
  }
  return 0;
}

}  // namespace lhpc::dispatch
