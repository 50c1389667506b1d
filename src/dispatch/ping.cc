#include "dispatch/ping.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <utility>

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

namespace {

struct RankStats {
  std::string node;
  std::vector<double> ms;
};

struct Tally {
  std::map<int, RankStats> ranks;
  int answered = 0, lost = 0;
  int not_sent = 0;  // of `lost`: pings to a rank that had already missed one
};

struct InFlight {
  Clock::time_point at;
  int target;  // the addressed rank; -1 on the task queue
};

void take_replies(amqp::Connection& c, std::map<std::string, InFlight>& inflight, Tally& t) {
  amqp::Delivery d;
  while (c.next_delivery(d)) {
    auto it = inflight.find(d.props.correlation_id);
    if (it == inflight.end()) {
      continue;  // a late answer to a ping already counted lost
    }
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - it->second.at).count();
    inflight.erase(it);
    ++t.answered;
    Json reply = Json::parse(d.body, nullptr, false);
    int rank = -1;
    std::string node = "?";
    if (reply.is_object()) {
      rank = static_cast<int>(json_int(reply, "rank", -1));
      node = json_string(reply, "node", "?");
    }
    auto& r = t.ranks[rank];
    r.node = node;
    r.ms.push_back(ms);
  }
}

// The lines after the pings: per rank, the silent ones, the summary; how ping ends.
Exit report(const Tally& t, const PingOptions& o, const PingTargets& tg, int total, double secs, double timeout_s,
            std::ostream& out) {
  for (const auto& [rank, r] : t.ranks) {
    out << fmt::format("rank {} node {}: {} replies, p50 {:.2f} ms, p99 {:.2f} ms\n", rank, r.node, r.ms.size(),
                       percentile(r.ms, 50), percentile(r.ms, 99));
  }
  std::string silent;
  for (int rank = 0; rank < tg.ranks; ++rank) {
    if (!t.ranks.count(rank)) {
      auto n = tg.nodes.find(rank);
      silent += fmt::format("{}{} ({})", silent.empty() ? "" : ", ", rank, n == tg.nodes.end() ? "?" : n->second);
    }
  }
  auto n = t.ranks.size();
  out << fmt::format("{}/{} pings answered by {} rank{} in {:.2f} s: {:.1f} pings/s\n", t.answered, total, n,
                     n == 1 ? "" : "s", secs, secs > 0 ? t.answered / secs : 0.0);
  if (!silent.empty()) {
    out << fmt::format("no reply within {} s from rank (node): {}\n", timeout_s, silent);
  }
  int expect = o.expect_ranks >= 0 ? o.expect_ranks : tg.ranks;
  if (t.answered == 0) {
    return Exit::failure;
  }
  if (t.lost > 0) {
    out << fmt::format(
        "{} ping{} got no reply within {} s{}\n", t.lost, t.lost == 1 ? "" : "s", timeout_s,
        t.not_sent > 0 ? fmt::format(" ({} not sent: their rank had missed one already)", t.not_sent) : "");
    return Exit::failure;
  }
  if (static_cast<int>(n) < expect) {
    out << fmt::format("only {} of the {} expected ranks answered\n", n, expect);
    return Exit::failure;
  }
  return Exit::ok;
}

}  // namespace

namespace {

// A queue exists (passive declare). On its own connection: a missing queue
// closes the channel that asked.
bool queue_exists(const amqp::Options& opts, const std::string& name) {
  try {
    amqp::Connection probe(opts);
    probe.queue_depth(name);
    return true;
  } catch (const Error&) {
    return false;
  }
}

// Sends `total` pings, `concurrency` at a time, and collects the replies.
// `dest(seq)` names the queue and the addressed rank (-1: any). Once a ping
// to a rank went unanswered, that rank's later pings count as lost without
// being sent: a silent rank costs one timeout, not `count` of them in a row.
Tally exchange(amqp::Connection& c, const PingOptions& o, const std::string& reply_queue, int total,
               const std::function<std::pair<std::string, int>(int)>& dest) {
  auto timeout = std::chrono::milliseconds(static_cast<long long>(o.timeout * 1000));
  std::string prefix = "lhpc-ping-" + random_hex(12) + "-";
  std::map<std::string, InFlight> inflight;
  std::set<int> silent;
  Tally t;
  auto send = [&](int seq, const std::pair<std::string, int>& to) {
    double unix_now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    amqp::Properties p;
    p.reply_to = reply_queue;
    p.correlation_id = prefix + std::to_string(seq);
    p.delivery_mode = 1;
    // A ping nobody takes must not linger in the queue.
    p.expiration = std::to_string(timeout.count());
    c.publish("", to.first, encode(Action::ping, {{"seq", seq}, {"sent", unix_now}}), p);
    inflight[p.correlation_id] = InFlight{Clock::now(), to.second};
  };
  for (int next = 0; t.answered + t.lost < total;) {
    while (static_cast<int>(inflight.size()) < o.concurrency && next < total) {
      auto to = dest(next);
      if (to.second >= 0 && silent.count(to.second)) {
        ++next, ++t.lost, ++t.not_sent;
      } else {
        send(next++, to);
      }
    }
    if (inflight.empty()) {
      continue;  // every ping left went to silent ranks: counted above
    }
    auto oldest = Clock::now();
    for (const auto& [k, f] : inflight) {
      oldest = std::min(oldest, f.at);
    }
    c.wait(oldest + timeout);
    take_replies(c, inflight, t);
    t.lost += static_cast<int>(std::erase_if(inflight, [&, now = Clock::now()](const auto& kv) {
      bool expired = now - kv.second.at >= timeout;
      if (expired && kv.second.target >= 0) {
        silent.insert(kv.second.target);
      }
      return expired;
    }));
  }
  return t;
}

}  // namespace

Exit run_ping(const config::Config& cfg, const PingOptions& o, const PingTargets& given, std::ostream& out) {
  if (o.count < 1 || o.concurrency < 1 || !(o.timeout > 0)) {
    throw Error(Exit::usage, "ping: --count and --concurrency must be at least 1, --timeout above 0",
                "e.g. lithops-hpc ping --count 100 --concurrency 8 --timeout 10");
  }
  config::require_amqp_url(cfg);
  amqp::Options opts = amqp::options_from(cfg.rabbitmq);
  opts.connection_name = "lithops-hpc ping";
  amqp::Connection c(opts);
  const auto& queue = cfg.rabbitmq.queue;
  PingTargets tg = given;
  // No deployment known: a standalone `worker` of this job (rank 0) still has
  // its rank queue, which reaches it while its slots are busy.
  if (tg.job.empty() && !tg.local_job.empty() && queue_exists(opts, rank_queue(queue, tg.local_job, 0))) {
    tg.job = tg.local_job;
    tg.ranks = 1;
  }
  c.declare_queue(queue, true);  // as the Lithops client does: durable, no arguments
  std::string reply_queue = c.declare_queue("", false, true, true);
  c.consume(reply_queue, /*no_ack=*/true, /*exclusive=*/true);

  // Ping i goes to rank i % ranks: each rank gets `count`, interleaved.
  const int targets = tg.job.empty() ? 1 : std::max(1, tg.ranks);
  const int total = o.count * targets;
  auto start = Clock::now();
  Tally t = exchange(c, o, reply_queue, total, [&](int seq) {
    return tg.job.empty() ? std::pair{queue, -1} : std::pair{rank_queue(queue, tg.job, seq % targets), seq % targets};
  });
  double secs = std::chrono::duration<double>(Clock::now() - start).count();
  Exit rc = report(t, o, tg, total, secs, o.timeout, out);
  if (t.answered == 0) {
    out << fmt::format("no reply within {} s: is a deployment consuming '{}' on {}?\n", o.timeout,
                       tg.job.empty() ? queue : rank_queue(queue, tg.job, 0) + "...", c.redacted_url());
  }
  return rc;
}

}  // namespace lhpc::dispatch
