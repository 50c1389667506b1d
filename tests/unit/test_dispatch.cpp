// The Lithops task protocol and the dispatcher's rules, without a broker or
// processes: decode/classify, split, one-call payloads, and the state machine
// driven through fake broker and handler ports.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include <signal.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <set>
#include <thread>

#include "dispatch/dispatcher.h"
#include "dispatch/handler_pool.h"
#include "dispatch/protocol.h"
#include "dispatch/runtime.h"

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <sstream>

using namespace lhpc;
using namespace lhpc::dispatch;

namespace {

Json job(int calls, const std::string& key = "J1") {
  Json ids = Json::array();
  Json ranges = Json::array();
  for (int i = 0; i < calls; ++i) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%05d", i);
    ids.push_back(buf);
    ranges.push_back(Json::array({i * 10, i * 10 + 9}));
  }
  return {{"job_key", key},       {"call_ids", ids},           {"data_byte_ranges", ranges},
          {"total_calls", calls}, {"worker_processes", calls}, {"config", {{"lithops", {{"backend", "singularity"}}}}}};
}

std::string body_with_payload(const std::string& action, const std::string& payload_text) {
  return Json{{"action", action}, {"payload", base64_encode(payload_text)}}.dump();
}

std::string reason_of(std::string_view body) {
  auto r = decode(body);
  auto* m = std::get_if<Malformed>(&r);
  return m ? m->reason : std::string("(not malformed)");
}

}  // namespace

TEST_CASE("base64 matches Python's b64encode and refuses what b64decode refuses") {
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("\xff\xfe\xfd") == "//79");
  for (std::string s : {"", "a", "ab", "abc", "abcd", "{\"k\": [1, 2]}"}) {
    CHECK(base64_decode(base64_encode(s)) == s);
  }
  CHECK(base64_decode("Zm9v\nYmFy") == std::string("foobar"));  // whitespace is skipped
  CHECK_FALSE(base64_decode("Zm9"));                            // missing padding
  CHECK_FALSE(base64_decode("Zm9v!!=="));                       // not in the alphabet
  CHECK_FALSE(base64_decode("Zg==Zg=="));                       // padding in the middle
  CHECK_FALSE(base64_decode("Z==="));
  CHECK_FALSE(base64_decode("-_8="));  // urlsafe alphabet is not Lithops'
}

TEST_CASE("a Lithops send_task message decodes to its payload and call count") {
  auto body = encode(Action::send_task, job(3));
  auto r = decode(body);
  REQUIRE(std::holds_alternative<Task>(r));
  auto& t = std::get<Task>(r);
  CHECK(t.action == Action::send_task);
  CHECK(t.calls == 3);
  CHECK(t.payload["job_key"] == "J1");
  // What Python's json.dumps + b64encode produce decodes the same way.
  std::string py = R"({"action": "get_metadata", "payload": ")" +
                   base64_encode(R"({"runtime_name": "rt", "log_level": 20, "backend": "minio"})") + "\"}";
  auto g = decode(py);
  REQUIRE(std::holds_alternative<Task>(g));
  CHECK(std::get<Task>(g).action == Action::get_metadata);
  CHECK(std::get<Task>(g).calls == 0);
}

TEST_CASE("every class of malformed message is named") {
  CHECK(reason_of("not json {") == "body is not JSON");
  CHECK(reason_of("[1, 2]") == "body is not a JSON object");
  CHECK(reason_of(R"({"payload": "e30="})") == "no action");
  CHECK(reason_of(R"({"action": 3, "payload": "e30="})") == "action is not a string");
  CHECK(reason_of(R"({"action": "rm_rf", "payload": "e30="})") == "unknown action 'rm_rf'");
  CHECK(reason_of(R"({"action": "send_task"})") == "no payload");
  CHECK(reason_of(R"({"action": "send_task", "payload": {"a": 1}})") == "payload is not a base64 string");
  CHECK(reason_of(R"({"action": "send_task", "payload": "%%%not-base64"})") == "payload is not valid base64");
  CHECK(reason_of(body_with_payload("send_task", "not json")) == "payload is not JSON");
  CHECK(reason_of(body_with_payload("send_task", "[1,2,3]")) == "payload is not a JSON object");
  CHECK(reason_of(body_with_payload("send_task", R"({"job_key": "x"})")) == "send_task payload has no call_ids list");
  auto p = job(3);
  p["data_byte_ranges"].erase(2);
  CHECK(reason_of(encode(Action::send_task, p)) == "call_ids (3) and data_byte_ranges (2) differ in length");
  p = job(3);
  p["total_calls"] = 5;
  CHECK(reason_of(encode(Action::send_task, p)) == "total_calls (5) differs from the number of call_ids (3)");
  p = job(1);
  p["call_ids"] = Json::array();
  p["data_byte_ranges"] = Json::array();
  p["total_calls"] = 0;
  CHECK(reason_of(encode(Action::send_task, p)) == "send_task payload has no calls (call_ids is empty)");
  // A ping needs no calls, only an object.
  CHECK(std::holds_alternative<Task>(decode(encode(Action::ping, {{"seq", 1}}))));
}

std::string deep(std::size_t levels) { return std::string(levels, '[') + std::string(levels, ']'); }

TEST_CASE("a message is bounded in size and depth before it is parsed, on both layers") {
  Limits lim{.max_bytes = 4096, .max_depth = 8};
  CHECK_FALSE(nests_deeper_than(deep(8), 8));
  CHECK(nests_deeper_than(deep(9), 8));
  CHECK_FALSE(nests_deeper_than(R"({"a": "[[[[[[[[[[[[\"[[[["})", 2));  // brackets in strings do not count
  CHECK(nests_deeper_than(R"({"a": "\\", "b": [[[1]]]})", 3));
  auto reason = [&](const std::string& body) {
    auto r = decode(body, lim);
    auto* m = std::get_if<Malformed>(&r);
    return m ? m->reason : std::string("(not malformed)");
  };
  CHECK(reason(std::string(5000, ' ')) == "message of 5000 bytes is over max_message_bytes (4096)");
  CHECK(reason(R"({"action": "ping", "payload": "e30=", "x": )" + deep(9) + "}") ==
        "message nests deeper than max_message_depth (8)");
  // The payload's own depth is judged after base64, before its JSON is parsed.
  CHECK(reason(body_with_payload("send_task", deep(9))) == "payload nests deeper than max_message_depth (8)");
  CHECK(std::holds_alternative<Task>(decode_payload(Action::ping, deep(7), lim)) == false);  // an array, not an object
  CHECK(std::holds_alternative<Task>(decode(encode(Action::send_task, job(2)), lim)));
  // The defaults are documented in lithops-hpc.toml(5).
  CHECK(Limits{}.max_bytes == 16u << 20);
  CHECK(Limits{}.max_depth == 64);
}

TEST_CASE("splitting keeps the same indices of call_ids and data_byte_ranges") {
  auto p = job(5);
  Calls c{Json(p)};
  REQUIRE(c.size() == 5);
  auto kept = Json::parse(c.slice(0, 2));
  auto rest = Json::parse(c.slice(2, 5));
  CHECK(kept["call_ids"] == Json::array({"00000", "00001"}));
  CHECK(kept["data_byte_ranges"] == Json::array({Json::array({0, 9}), Json::array({10, 19})}));
  CHECK(kept["total_calls"] == 2);
  CHECK(rest["call_ids"] == Json::array({"00002", "00003", "00004"}));
  CHECK(rest["data_byte_ranges"][0] == Json::array({20, 29}));
  CHECK(rest["total_calls"] == 3);
  CHECK(rest["worker_processes"] == 5);  // as delivered
  CHECK(rest["job_key"] == "J1");
  CHECK(rest["config"] == p["config"]);
  CHECK(rest.size() == p.size());
  // Both halves are valid messages again.
  CHECK(std::get<Task>(decode(encode_text(Action::send_task, c.slice(2, 5)))).calls == 3);
}

TEST_CASE("handlers get one call per payload with worker_processes = 1") {
  Calls c(job(3));
  for (std::size_t i = 0; i < 3; ++i) {
    auto one = Json::parse(c.slice(i, i + 1, /*one_call=*/true));
    CHECK(one["total_calls"] == 1);
    CHECK(one["worker_processes"] == 1);
    CHECK(one["call_ids"].size() == 1);
    CHECK(one["data_byte_ranges"][0][0] == static_cast<int>(i * 10));
  }
  CHECK(Json::parse(c.slice(2, 3, true))["call_ids"][0] == "00002");
  CHECK(c.describe(0, 3) == "J1/00000..00002 (3 calls)");
  CHECK(c.describe(1, 2) == "J1/00001");
  CHECK(describe_calls(job(3)) == "J1/00000..00002 (3 calls)");
}

TEST_CASE("a job key or call id from the publisher reaches a log line escaped and bounded") {
  // An escape sequence in job_key would reach the terminal of whoever reads
  // the log; a 100 KB call id would make one log line of 100 KB.
  auto p = job(2, "J\x1b[2J\nforged line");
  p["call_ids"][1] = std::string(100000, 'x');
  for (const auto& line : {Calls(Json(p)).describe(0, 2), describe_calls(p), Calls(Json(p)).describe(0, 1)}) {
    CHECK(line.find('\x1b') == std::string::npos);
    CHECK(line.find('\n') == std::string::npos);
    CHECK(line.size() < k_logged_id_bytes + 64);
  }
  CHECK(Calls(Json(p)).describe(0, 1).find("00000") != std::string::npos);
}

TEST_CASE("a message of many calls is split by its pieces, never by copying it per slice") {
  // 20,000 calls of a payload with a large shared part: copying the payload
  // per one-call slice (as before) would move about 20,000 x 400 KB.
  auto p = job(20000);
  p["config"]["blob"] = std::string(400000, 'x');
  Calls c(std::move(p));
  std::size_t bytes = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < 100; ++i) {
    bytes += c.slice(i, i + 1, true).size();
  }
  auto rest = c.slice(100, 20000);
  CHECK(bytes < 100 * 400200);
  CHECK(std::get<Task>(decode(encode_text(Action::send_task, rest))).calls == 19900);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20));
}

TEST_CASE("prefetch: one per free slot, one per message held, and one reserve") {
  CHECK(prefetch_for(4, 0) == 5);  // idle node with 4 slots: 4 start, 1 waits in the reserve
  CHECK(prefetch_for(0, 4) == 5);  // 4 single-call tasks running: the reserve takes one more
  CHECK(prefetch_for(0, 1) == 2);  // one 4-call message holds every slot
  CHECK(prefetch_for(1, 2) == 4);  // a free slot, a running task and a get_metadata
  CHECK(prefetch_for(0, 0) == 1);  // no handler ready: the reserve only (never 0, "unlimited")
  CHECK(prefetch_for(-1, -1) == 1);
  CHECK(prefetch_for(40000, 40000) == 65535);  // basic.qos's 16 bits
}

TEST_CASE("rank queues are per job and rank") {
  CHECK(rank_queue("task_queue", "1234", 7) == "task_queue.rank.1234.7");
  CHECK(rank_queue("q", "local", 0) != rank_queue("q", "local", 1));
}

TEST_CASE("a message id is stable across redeliveries") {
  CHECK(body_id("abc") == body_id("abc"));
  CHECK(body_id("abc") != body_id("abd"));
  CHECK(body_id("abc").rfind("body-", 0) == 0);
}

// --- the dispatcher --------------------------------------------------------

namespace {

struct FakeBroker : BrokerPort {
  struct Published {
    std::string routing_key, body;
    amqp::Properties props;
    std::uint64_t seq;
  };
  std::vector<std::string> events;
  std::vector<std::uint64_t> acked;
  std::vector<std::uint64_t> requeued;
  std::vector<Published> published;
  std::vector<int> prefetches;
  std::vector<bool> slot_consumer;  // each set_slot_consumer
  bool cancelled = false;
  std::uint64_t seq = 0;

  void ack(std::uint64_t tag) override {
    acked.push_back(tag);
    events.push_back("ack " + std::to_string(tag));
  }
  void reject(std::uint64_t tag, bool requeue) override {
    if (requeue) {
      requeued.push_back(tag);
    }
    events.push_back("reject " + std::to_string(tag));
  }
  std::uint64_t publish(const std::string& rk, const std::string& body, const amqp::Properties& p) override {
    published.push_back({rk, body, p, ++seq});
    events.push_back("publish " + rk);
    return seq;
  }
  // Recorded as "exchange:NAME" in published[].routing_key.
  std::uint64_t publish_to_exchange(const std::string& exchange, const std::string& body,
                                    const amqp::Properties& p) override {
    published.push_back({"exchange:" + exchange, body, p, ++seq});
    events.push_back("publish exchange:" + exchange);
    return seq;
  }
  void declare_queue(const std::string& name) override { events.push_back("declare " + name); }
  void declare_exchange(const std::string& name) override { events.push_back("declare exchange " + name); }
  void set_prefetch(int n) override { prefetches.push_back(n); }
  void set_slot_consumer(bool on) override { slot_consumer.push_back(on); }
  void stop_consuming() override { cancelled = true; }
};

struct FakeHandlers : HandlerPort {
  struct Sent {
    int handler;
    Json request;
  };
  std::vector<Sent> sent;
  std::vector<std::string>* events = nullptr;
  void send(int h, const std::string& line) override {
    REQUIRE(!line.empty());
    REQUIRE(line.back() == '\n');
    sent.push_back({h, Json::parse(line)});
    if (events) {
      events->push_back("start " + std::to_string(h));
    }
  }
};

struct Rig {
  FakeBroker broker;
  FakeHandlers handlers;
  Dispatcher d;
  std::uint64_t next_tag = 1;
  explicit Rig(int slots, CrashRecordPort* record = nullptr, const std::string& runtime = "",
               std::uint64_t memory_mb = 0)
      : d({.slots = slots,
           .queue = "task_queue",
           .rank = 3,
           .node = "n7",
           .rank_queue = "task_queue.rank.J.3",
           .runtime = runtime,
           .memory_mb = memory_mb},
          broker, handlers, record) {
    handlers.events = &broker.events;
    for (int h = 0; h < d.handlers(); ++h) {
      d.on_handler_ready(h);
    }
    d.on_connected(d.desired_prefetch(), d.desired_slot_consumer());
  }
  std::uint64_t deliver(const std::string& body, amqp::Properties props = {}, bool redelivered = false,
                        const std::string& routing_key = "task_queue") {
    amqp::Delivery del;
    del.tag = next_tag++;
    del.routing_key = routing_key;
    del.redelivered = redelivered;
    del.body = body;
    del.props = std::move(props);
    d.on_delivery(std::move(del));
    return del.tag;
  }
  void reply(int h, bool ok = true, const std::string& error = "") {
    // The last request sent to h.
    for (auto it = handlers.sent.rbegin(); it != handlers.sent.rend(); ++it) {
      if (it->handler == h) {
        Json r = {{"id", it->request["id"]}, {"ok", ok}, {"elapsed", 0.01}};
        if (!error.empty()) {
          r["error"] = error;
        }
        if (it->request["action"] == "ping") {
          r["echo"] = it->request["payload"];
        }
        d.on_handler_reply(h, r);
        return;
      }
    }
    FAIL("no request was sent to handler " << h);
  }
  void confirm_all(bool ack = true) {
    for (auto& p : broker.published) {
      d.on_confirm({p.seq, ack});
    }
  }
};

}  // namespace

TEST_CASE("a task is acked only after its handler finished, one call per slot") {
  Rig r(2);
  CHECK(r.d.prefetch() == 3);
  auto t1 = r.deliver(encode(Action::send_task, job(1, "A")));
  auto t2 = r.deliver(encode(Action::send_task, job(1, "B")));
  CHECK(r.handlers.sent.size() == 2);
  CHECK(r.d.busy_slots() == 2);
  CHECK(r.broker.acked.empty());
  CHECK(r.handlers.sent[0].request["payload"]["worker_processes"] == 1);
  r.reply(1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{t2});
  // The ack frees a unit of the prefetch: the broker hands over the next one.
  auto t3 = r.deliver(encode(Action::send_task, job(1, "C")));
  REQUIRE(r.handlers.sent.size() == 3);
  CHECK(r.handlers.sent[2].handler == 1);
  CHECK(r.handlers.sent[2].request["payload"]["job_key"] == "C");
  r.reply(0);
  r.reply(1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{t2, t1, t3});
  CHECK(r.d.counters().tasks_done == 3);
  CHECK(r.d.idle());
  CHECK(r.broker.published.empty());
  CHECK(r.broker.prefetches.empty());  // single-call messages: always one per slot
}

TEST_CASE("a rank whose slots are all busy holds one task in reserve and sends the broker nothing") {
  Rig r(2);
  CHECK(r.d.prefetch() == 3);
  auto a = r.deliver(encode(Action::send_task, job(1, "A")));
  r.deliver(encode(Action::send_task, job(1, "B")));
  // Every slot busy, the reserve free: two held + one.
  CHECK(r.d.prefetch() == 3);
  r.deliver(encode(Action::send_task, job(1, "C")));  // the reserve: it waits here
  CHECK(r.handlers.sent.size() == 2);
  // The reserve taken: what it holds plus one is what it has, so the broker
  // keeps the rest of the queue, in order, for whichever rank frees a slot.
  CHECK(r.d.desired_prefetch() == 3);
  // Neither republished nor rotated; no basic.qos (given back only once it
  // waited reserve_patience: the case below).
  CHECK(r.broker.events == std::vector<std::string>{"start 0", "start 1"});
  CHECK(r.broker.prefetches.empty());
  // A slot frees: the reserved task starts at once, no broker round trip.
  r.reply(0);
  REQUIRE(r.handlers.sent.size() == 3);
  CHECK(r.handlers.sent[2].handler == 0);
  CHECK(r.handlers.sent[2].request["payload"]["job_key"] == "C");
  CHECK(r.broker.events == std::vector<std::string>{"start 0", "start 1", "ack " + std::to_string(a), "start 0"});
  CHECK(r.d.prefetch() == 3);  // the ack alone frees the reserve for the next message
  CHECK(r.broker.prefetches.empty());
}

TEST_CASE(
    "a task that waited reserve_patience in a busy rank's reserve is given back once, for a free slot elsewhere") {
  Rig r(2);
  auto a = r.deliver(encode(Action::send_task, job(1, "A")));
  r.deliver(encode(Action::send_task, job(1, "B")));
  CHECK_FALSE(r.d.next_deadline());  // nothing waits
  auto body = encode(Action::send_task, job(1, "C"));
  auto c = r.deliver(body);  // the reserve
  auto arrived = Dispatcher::Clock::now();
  REQUIRE(r.d.next_deadline());
  CHECK(*r.d.next_deadline() <= arrived + k_reserve_patience);
  CHECK(*r.d.next_deadline() + std::chrono::milliseconds(100) >= arrived + k_reserve_patience);
  // Not before its time.
  r.d.on_tick(arrived - std::chrono::milliseconds(1));
  CHECK(r.broker.requeued.empty());
  // Then requeued to its place at the head of the queue, where an idle rank's
  // slot consumer (the higher x-priority) takes it before any reserve.
  r.d.on_tick(arrived + k_reserve_patience + std::chrono::seconds(1));
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{c});
  CHECK(r.d.counters().returned == 1);
  CHECK(r.broker.published.empty());  // given back, not republished: nothing to confirm, the order kept
  CHECK(r.d.prefetch() == 3);         // the reserve is free again, no basic.qos
  CHECK(r.broker.prefetches.empty());
  // No rank was idle: the broker hands it back to this reserve. It stays now,
  // however long it waits: no bouncing between busy ranks.
  auto c2 = r.deliver(body, {}, /*redelivered=*/true);
  CHECK_FALSE(r.d.next_deadline());
  r.d.on_tick(arrived + std::chrono::hours(1));
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{c});
  // It starts the moment a slot frees, as before.
  r.reply(0);
  REQUIRE(r.handlers.sent.size() == 3);
  CHECK(r.handlers.sent[2].request["payload"]["job_key"] == "C");
  r.reply(0);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{a, c2});
  // Started once: if the same message came back later, it could be given back again.
  r.deliver(encode(Action::send_task, job(1, "D")));
  r.deliver(encode(Action::send_task, job(1, "E")));
  r.deliver(body, {}, /*redelivered=*/true);
  CHECK(r.d.next_deadline());
}

TEST_CASE("control messages and tasks that start are never given back") {
  Rig r(1);
  r.deliver(encode(Action::send_task, job(1, "A")));  // starts at once
  r.deliver(encode(Action::get_metadata, {{"runtime_name", "rt"}}));
  CHECK_FALSE(r.d.next_deadline());
  r.d.on_tick(Dispatcher::Clock::now() + std::chrono::hours(1));
  CHECK(r.broker.requeued.empty());
  CHECK(r.d.counters().returned == 0);
}

TEST_CASE("with every slot busy, get_metadata in the reserve is answered at once, then frees the reserve") {
  Rig r(1);
  r.deliver(encode(Action::send_task, job(1, "A")));
  CHECK(r.d.prefetch() == 2);  // one held + the reserve
  auto meta = r.deliver(encode(Action::get_metadata, {{"runtime_name", "rt"}}));
  REQUIRE(r.handlers.sent.size() == 2);
  CHECK(r.handlers.sent[1].handler == r.d.control());
  CHECK(r.handlers.sent[1].request["action"] == "get_metadata");
  CHECK(r.d.prefetch() == 3);  // held now: the reserve takes the next message
  r.deliver(encode(Action::send_task, job(1, "B")));
  CHECK(r.handlers.sent.size() == 2);  // B waits in the reserve
  r.reply(r.d.control());
  CHECK(r.broker.acked == std::vector<std::uint64_t>{meta});
  CHECK(r.d.prefetch() == 2);
  CHECK(r.broker.prefetches == std::vector<int>{3, 2});
  r.reply(0);
  CHECK(r.handlers.sent.back().request["payload"]["job_key"] == "B");
  CHECK(r.d.counters().metadata == 1);
}

TEST_CASE("the slot consumer runs only while a slot is free: an idle rank's slot comes before a busy rank's reserve") {
  Rig r(2);
  CHECK(r.d.slot_consumer());
  r.deliver(encode(Action::send_task, job(1, "A")));
  CHECK(r.broker.slot_consumer.empty());  // a slot is still free
  r.deliver(encode(Action::send_task, job(1, "B")));
  CHECK(r.broker.slot_consumer == std::vector<bool>{false});  // every slot busy: the reserve alone
  r.deliver(encode(Action::send_task, job(1, "C")));
  r.reply(0);  // C takes the freed slot: still every slot busy
  CHECK(r.broker.slot_consumer == std::vector<bool>{false});
  r.reply(1);
  CHECK(r.broker.slot_consumer == std::vector<bool>{false, true});
  r.reply(0);
  CHECK(r.broker.slot_consumer == std::vector<bool>{false, true});
  CHECK(r.d.idle());
  // A reconnect starts from what the state calls for.
  CHECK(r.d.desired_slot_consumer());
}

TEST_CASE("a message with more calls than free slots is split; the rest is confirmed before anything starts") {
  Rig r(2);
  auto tag = r.deliver(encode(Action::send_task, job(5, "BIG")));
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.handlers.sent.empty());  // nothing starts before the confirm
  const auto& rest = r.broker.published[0];
  CHECK(rest.routing_key == "task_queue");
  CHECK(rest.props.delivery_mode == 2);
  auto t = std::get<Task>(decode(rest.body));
  CHECK(t.calls == 3);
  CHECK(t.payload["call_ids"] == Json::array({"00002", "00003", "00004"}));
  CHECK(t.payload["total_calls"] == 3);
  r.confirm_all();
  REQUIRE(r.handlers.sent.size() == 2);
  CHECK(r.handlers.sent[0].request["payload"]["call_ids"] == Json::array({"00000"}));
  CHECK(r.handlers.sent[1].request["payload"]["call_ids"] == Json::array({"00001"}));
  CHECK(r.broker.events[0] == "publish task_queue");
  r.reply(0);
  CHECK(r.broker.acked.empty());  // its other kept call still runs
  r.reply(1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.d.counters().splits == 1);
  // While one 2-call message held both slots the prefetch dropped to 2 (it
  // and the reserve), then rose as its first call freed a slot.
  CHECK(r.broker.prefetches == std::vector<int>{2, 3});
}

TEST_CASE("a refused remainder gives the whole message back, nothing starts") {
  Rig r(1);
  auto tag = r.deliver(encode(Action::send_task, job(3)));
  r.confirm_all(false);
  CHECK(r.handlers.sent.empty());
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{tag});
  CHECK(r.d.idle());
}

TEST_CASE("get_metadata and ping never wait behind tasks this rank holds") {
  Rig r(2);
  r.deliver(encode(Action::send_task, job(1, "A")));
  auto meta = r.deliver(encode(Action::get_metadata, {{"runtime_name", "rt"}}));
  REQUIRE(r.handlers.sent.size() == 2);
  CHECK(r.handlers.sent[1].handler == r.d.control());
  CHECK(r.handlers.sent[1].request["action"] == "get_metadata");
  // The control message holds a unit of the prefetch: raised so that the
  // free slot still gets a task and the reserve stays free.
  CHECK(r.d.prefetch() == 4);
  r.deliver(encode(Action::send_task, job(1, "B")));
  CHECK(r.d.busy_slots() == 2);
  CHECK(r.d.prefetch() == 4);
  r.reply(r.d.control());
  CHECK(r.broker.acked == std::vector<std::uint64_t>{meta});
  CHECK(r.d.prefetch() == 3);
  CHECK(r.d.counters().metadata == 1);
}

TEST_CASE("a ping through the rank queue is answered while every slot is busy, and never acked") {
  Rig r(1);
  auto running = r.deliver(encode(Action::send_task, job(1, "A")));
  amqp::Properties pp;
  pp.reply_to = "amq.gen-reply";
  pp.correlation_id = "c-1";
  r.deliver(encode(Action::ping, {{"seq", 1}}), pp, false, "task_queue.rank.J.3");
  REQUIRE(r.handlers.sent.size() == 2);
  CHECK(r.handlers.sent[1].handler == r.d.control());
  CHECK(r.d.prefetch() == 2);  // consumed without acks: outside the prefetch (the task and the reserve)
  Json req = r.handlers.sent[1].request;
  r.d.on_handler_reply(r.d.control(), {{"id", req["id"]}, {"ok", true}, {"echo", req["payload"]}});
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "amq.gen-reply");
  CHECK(r.broker.published[0].props.correlation_id == "c-1");
  auto reply = Json::parse(r.broker.published[0].body);
  CHECK(reply["rank"] == 3);
  CHECK(reply["node"] == "n7");
  CHECK(reply["echo"]["seq"] == 1);
  CHECK(r.broker.acked.empty());  // an ack of a no-ack delivery would close the channel
  CHECK(r.d.counters().pings == 1);
  // A ping through the task queue (no deployment known) is acked as usual.
  pp.correlation_id = "c-2";
  auto shared = r.deliver(encode(Action::ping, {{"seq", 2}}), pp);
  r.reply(r.d.control());
  CHECK(r.broker.acked == std::vector<std::uint64_t>{shared});
  // Draining: a rank-queue ping is dropped, not rejected.
  r.d.drain();
  r.deliver(encode(Action::ping, {{"seq", 3}}), pp, false, "task_queue.rank.J.3");
  CHECK(r.broker.requeued.empty());
  r.reply(0);
  CHECK(r.broker.acked.back() == running);
}

TEST_CASE("a handler crash requeues the call once with a crash count, then dead-letters it") {
  Rig r(2);
  auto tag = r.deliver(encode(Action::send_task, job(1, "CR")));
  r.d.on_handler_lost(0, "killed by signal 9 (Killed)");
  REQUIRE(r.broker.published.size() == 1);
  auto again = r.broker.published[0];  // a copy: later publishes grow the vector
  CHECK(again.routing_key == "task_queue");
  CHECK(amqp::table_int(again.props.headers, k_hdr_crashes) == 1);
  CHECK(again.props.delivery_mode == 2);
  CHECK(r.broker.acked.empty());  // only once the broker has the copy
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.d.counters().tasks_requeued == 1);

  // The copy comes back (to any worker) and crashes again: dead-lettered.
  r.d.on_handler_ready(0);
  auto tag2 = r.deliver(again.body, again.props);
  r.d.on_handler_lost(0, "killed by signal 9 (Killed)");
  REQUIRE(r.broker.published.size() == 2);
  auto& dead = r.broker.published[1];
  CHECK(dead.routing_key == "task_queue.dead");
  CHECK(amqp::table_string(dead.props.headers, k_hdr_reason).find("crashed the handler 2 times") != std::string::npos);
  CHECK(amqp::table_int(dead.props.headers, k_hdr_rank) == 3);
  CHECK(amqp::table_string(dead.props.headers, k_hdr_host) == "n7");
  CHECK(amqp::table_string(dead.props.headers, k_hdr_message_id) == body_id(again.body));
  r.d.on_confirm({dead.seq, true});
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag, tag2});
  CHECK(r.d.counters().dead_lettered == 1);
  CHECK(r.d.idle());
}

TEST_CASE("a crash in a multi-call message requeues only the call that was running") {
  Rig r(2);
  auto tag = r.deliver(encode(Action::send_task, job(2, "M")));
  r.reply(0);
  r.d.on_handler_lost(1, "exited with code 1");
  REQUIRE(r.broker.published.size() == 1);
  auto t = std::get<Task>(decode(r.broker.published[0].body));
  CHECK(t.payload["call_ids"] == Json::array({"00001"}));
  CHECK(t.payload["total_calls"] == 1);
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
}

TEST_CASE("malformed messages are dead-lettered with the reason, then acked") {
  Rig r(1);
  auto tag = r.deliver("this is not json");
  REQUIRE(r.broker.published.size() == 1);
  auto& dead = r.broker.published[0];
  CHECK(dead.routing_key == "task_queue.dead");
  CHECK(dead.body == "this is not json");
  CHECK(amqp::table_string(dead.props.headers, k_hdr_reason) == "malformed: body is not JSON");
  CHECK(r.broker.acked.empty());
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.handlers.sent.empty());
}

namespace {
// What the dispatcher logs, for the scope.
struct LogCapture {
  std::ostringstream out;
  std::shared_ptr<spdlog::logger> old = spdlog::default_logger();
  LogCapture() {
    auto logger = std::make_shared<spdlog::logger>("capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(out));
    logger->set_level(spdlog::level::debug);
    spdlog::set_default_logger(logger);
  }
  ~LogCapture() { spdlog::set_default_logger(old); }
};
}  // namespace

TEST_CASE("a publisher's message id and action reach the log with their control characters escaped") {
  LogCapture logs;
  Rig r(1);
  amqp::Properties props;
  props.message_id =
      "id\x1b]0;owned\x07\xc2\x9b"
      "2J";
  r.deliver(R"({"action": "\u001b[2Jrm", "payload": ""})", props);
  auto text = logs.out.str();
  CHECK(text.find('\x1b') == std::string::npos);
  CHECK(text.find('\x07') == std::string::npos);
  CHECK(text.find("message id\\x1b]0;owned\\x07\\xc2\\x9b2J is malformed") != std::string::npos);
  CHECK(text.find("unknown action '\\x1b[2Jrm'") != std::string::npos);
}

TEST_CASE("a handler's error reaches the log bounded, its control characters escaped") {
  LogCapture logs;
  Rig r(1);
  r.deliver(encode(Action::send_task, job(1)));
  r.reply(0, false, "Boom\x1b[2J\r\n" + std::string(100000, 'e'));
  auto text = logs.out.str();
  CHECK(text.find('\x1b') == std::string::npos);
  CHECK(text.find("could not run: Boom\\x1b[2J\\x0d\\x0aeee") != std::string::npos);
  CHECK(text.find("(100010 bytes)") != std::string::npos);
  CHECK(text.size() < 2000);
}

TEST_CASE("a call the handler could not run is counted failed and frees its slot") {
  Rig r(1);
  auto tag = r.deliver(encode(Action::send_task, job(1)));
  r.reply(0, false, "StorageNoSuchKeyError: job data deleted");
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.d.counters().tasks_failed == 1);
  CHECK(r.d.busy_slots() == 0);
}

TEST_CASE("drain: stop consuming, give back what has not started, finish what runs") {
  Rig r(1);
  auto running = r.deliver(encode(Action::send_task, job(1, "R")));
  auto waiting = r.deliver(encode(Action::send_task, job(1, "W")));
  r.d.drain();
  CHECK(r.broker.cancelled);
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{waiting});
  CHECK_FALSE(r.d.idle());
  // In flight before the cancel arrived: straight back.
  auto late = r.deliver(encode(Action::send_task, job(1, "L")));
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{waiting, late});
  r.reply(0);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{running});
  CHECK(r.d.idle());
}

TEST_CASE("abort after the drain timeout gives everything back") {
  Rig r(1);
  auto running = r.deliver(encode(Action::send_task, job(1)));
  r.d.drain();
  r.d.abort();
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{running});
  CHECK(r.d.idle());
}

TEST_CASE("after a lost connection running calls finish but are not acked") {
  Rig r(2);
  r.deliver(encode(Action::send_task, job(1)));
  r.deliver(encode(Action::send_task, job(3)));  // split, waiting for its confirm
  r.d.on_disconnected();
  r.reply(0);
  CHECK(r.broker.acked.empty());
  CHECK(r.d.idle());
  // A new connection starts from a clean slate.
  r.d.on_connected(r.d.desired_prefetch(), r.d.desired_slot_consumer());
  auto tag = r.deliver(encode(Action::send_task, job(1)));
  r.reply(0);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
}

TEST_CASE("a call that finishes after its connection was lost is counted as a duplicate") {
  Rig r(2);
  r.deliver(encode(Action::send_task, job(1, "D")));
  r.d.on_disconnected();
  r.reply(0);
  CHECK(r.d.counters().duplicates == 1);
  CHECK(r.d.counters().tasks_done == 1);
}

TEST_CASE("an oversized message is dead-lettered with its headers only, then acked") {
  Rig r(1);
  amqp::Delivery del;
  del.tag = 41;
  del.routing_key = "task_queue";
  del.oversized = true;
  del.body_size = 300u << 20;
  del.props.message_id = "big";
  del.props.headers["x-mine"] = std::string("kept");
  r.d.on_delivery(std::move(del));
  CHECK(r.handlers.sent.empty());
  REQUIRE(r.broker.published.size() == 1);
  const auto& p = r.broker.published[0];
  CHECK(p.routing_key == "task_queue.dead");
  CHECK(p.body.empty());
  CHECK(amqp::table_string(p.props.headers, "x-mine") == "kept");
  CHECK(amqp::table_string(p.props.headers, k_hdr_reason).find("over rabbitmq.max_message_bytes: 314572800 bytes") ==
        0);
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{41});
}

TEST_CASE("a message that outlived the broker's consumer_timeout twice is dead-lettered on its next delivery") {
  Rig r(2);
  auto body = encode(Action::send_task, job(1, "LONG"));
  r.deliver(body);
  auto what = r.d.on_consumer_timeout(std::chrono::milliseconds(0));
  CHECK(what.find("job LONG") == 0);
  CHECK(what.find("1 of 2") != std::string::npos);
  r.d.on_disconnected();
  r.d.on_connected(r.d.desired_prefetch(), r.d.desired_slot_consumer());
  // Once: it runs again (the first copy still runs in the other slot).
  r.deliver(body, {}, /*redelivered=*/true);
  CHECK(r.handlers.sent.size() == 2);
  CHECK(r.d.on_consumer_timeout(std::chrono::milliseconds(0)).find("2 of 2") != std::string::npos);
  r.d.on_disconnected();
  r.d.on_connected(r.d.desired_prefetch(), r.d.desired_slot_consumer());
  auto tag = r.deliver(body, {}, true);
  CHECK(r.handlers.sent.size() == 2);  // never a third start
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue.dead");
  CHECK(amqp::table_string(r.broker.published[0].props.headers, k_hdr_reason).find("consumer_timeout 2 times") !=
        std::string::npos);
  r.confirm_all();
  CHECK(r.broker.acked.back() == tag);
  CHECK(r.d.counters().consumer_timeouts == 2);
  // Another message is untouched by it.
  r.reply(0);
  r.reply(1);
  CHECK(r.d.counters().duplicates == 2);
}

TEST_CASE("a channel closed for the broker's consumer_timeout is told apart from other closes") {
  amqp::BrokerClose c{true, 406,
                      "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: "
                      "5000 ms. This timeout value can be configured, see consumers doc guide to learn more"};
  CHECK(amqp::consumer_timeout_of(c) == 5000);
  c.text = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out";
  CHECK(amqp::consumer_timeout_of(c) == 0);
  c.text = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'task_queue'";
  CHECK(!amqp::consumer_timeout_of(c));
  c = {false, 320, "CONNECTION_FORCED - broker forced connection closure"};
  CHECK(!amqp::consumer_timeout_of(c));
}

TEST_CASE("tasks wait for handlers that are not ready yet") {
  FakeBroker b;
  FakeHandlers h;
  Dispatcher d({.slots = 2}, b, h);
  d.on_connected(d.desired_prefetch(), d.desired_slot_consumer());
  amqp::Delivery del;
  del.tag = 1;
  del.body = encode(Action::send_task, job(1));
  d.on_delivery(del);
  CHECK(h.sent.empty());
  d.on_handler_ready(1);
  REQUIRE(h.sent.size() == 1);
  CHECK(h.sent[0].handler == 1);
}

TEST_CASE("a message nesting 100,000 levels is dead-lettered with the reason, and the rank lives") {
  Rig r(1);
  // A valid send_task (267 KB): before the bounds it parsed, then overflowed
  // the stack in dump() when handed to a handler.
  auto p = job(1, "DEEP");
  p["config"] = Json::object();
  std::string text = p.dump();
  text.insert(text.size() - 1, ",\"x\":" + deep(100000));
  auto tag = r.deliver(body_with_payload("send_task", text));
  CHECK(r.handlers.sent.empty());
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue.dead");
  CHECK(amqp::table_string(r.broker.published[0].props.headers, k_hdr_reason) ==
        "malformed: payload nests deeper than max_message_depth (64)");
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.d.counters().dead_lettered == 1);
  // Oversized: dead-lettered the same way.
  Rig small(1);
  auto big = small.deliver(std::string(17u << 20, ' '));
  CHECK(amqp::table_string(small.broker.published.at(0).props.headers, k_hdr_reason) ==
        "malformed: message of 17825792 bytes is over max_message_bytes (16777216)");
  small.confirm_all();
  CHECK(small.broker.acked == std::vector<std::uint64_t>{big});
}

namespace {
struct FakeRecord : CrashRecordPort {
  std::vector<std::string> events;
  std::set<std::string> killers;
  void begin(std::string_view body) override { events.push_back("begin " + body_id(body)); }
  void end() override { events.push_back("end"); }
  bool killed_before(std::string_view body) override { return killers.count(std::string(body)) > 0; }
};
}  // namespace

TEST_CASE("a redelivered message that killed a dispatcher here is dead-lettered, never processed again") {
  FakeRecord rec;
  Rig r(1, &rec);
  auto body = encode(Action::send_task, job(1, "K"));
  // Processing is recorded from decoding to handing the call out.
  r.deliver(body);
  CHECK(rec.events == std::vector<std::string>{"begin " + body_id(body), "end"});
  r.reply(0);
  // The broker hands it out again after a dispatcher died on it.
  rec.killers.insert(body);
  rec.events.clear();
  auto tag = r.deliver(body, {}, /*redelivered=*/true);
  CHECK(rec.events.empty());
  CHECK(r.handlers.sent.size() == 1);  // not started again
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue.dead");
  CHECK(amqp::table_string(r.broker.published[0].props.headers, k_hdr_reason).find("killed a dispatcher") == 0);
  r.confirm_all();
  CHECK(r.broker.acked.back() == tag);
  // Redelivered for another reason (a lost connection): processed as usual.
  auto other = encode(Action::send_task, job(1, "L"));
  r.deliver(other, {}, true);
  CHECK(r.handlers.sent.back().request["payload"]["job_key"] == "L");
}

TEST_CASE("the in-flight record outlives its dispatcher and is read by the next on the node") {
  char tmpl[] = "/tmp/lhpc-inflight-XXXXXX";
  REQUIRE(::mkdtemp(tmpl));
  std::string dir = std::string(tmpl) + "/n1";
  auto body = encode(Action::send_task, job(1, "POISON"));
  {
    // A dispatcher that dies mid-message never runs end() nor its destructor:
    // simulated by a child process that exits at once.
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      InflightRecord dying(dir, "J-0");
      dying.begin(body);
      ::_exit(0);
    }
    int st = 0;
    ::waitpid(pid, &st, 0);
  }
  InflightRecord next(dir, "J-1");
  CHECK(next.killed_before(body));
  CHECK_FALSE(next.killed_before(encode(Action::send_task, job(1, "FINE"))));
  // A message processed to the end leaves nothing behind.
  next.begin(encode(Action::send_task, job(1, "OK")));
  next.end();
  InflightRecord third(dir, "J-2");
  CHECK_FALSE(third.killed_before(encode(Action::send_task, job(1, "OK"))));
  struct stat st {};
  REQUIRE(::stat(dir.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  std::filesystem::remove_all(tmpl);
}

TEST_CASE("a message another running rank on the node is processing is no crash; once that rank dies it is") {
  char tmpl[] = "/tmp/lhpc-inflight-XXXXXX";
  REQUIRE(::mkdtemp(tmpl));
  std::string dir = std::string(tmpl) + "/n1";
  auto body = encode(Action::send_task, job(1, "BUSY"));
  int ready[2], go[2];
  REQUIRE(::pipe(ready) == 0);
  REQUIRE(::pipe(go) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // A rank named as the worker names it (<job>-<rank>-<pid>), stopped in
    // the middle of a message; it dies there when told to.
    InflightRecord busy(dir, "J-0-" + std::to_string(::getpid()));
    busy.begin(body);
    char c = 'r';
    (void)!::write(ready[1], &c, 1);
    (void)!::read(go[0], &c, 1);
    ::_exit(0);  // exit-codes: a forked test child
  }
  char c = 0;
  REQUIRE(::read(ready[0], &c, 1) == 1);
  InflightRecord other(dir, "J-1-" + std::to_string(::getpid()));
  // The same message, given back by a reserve, redelivered to a rank beside it.
  CHECK_FALSE(other.killed_before(body));
  REQUIRE(::write(go[1], &c, 1) == 1);
  int st = 0;
  ::waitpid(pid, &st, 0);
  CHECK(other.killed_before(body));
  for (int fd : {ready[0], ready[1], go[0], go[1]}) {
    ::close(fd);
  }
  std::filesystem::remove_all(tmpl);
}

TEST_CASE("a handler reply of the wrong shape counts as a failed call, never an exception") {
  Rig r(1);
  auto tag = r.deliver(encode(Action::send_task, job(1)));
  Json req = r.handlers.sent.back().request;
  CHECK_NOTHROW(r.d.on_handler_reply(0, {{"id", req["id"]}, {"ok", "yes"}, {"error", 42}}));
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.d.counters().tasks_failed == 1);
  // A reply for a request it does not run is ignored.
  CHECK_NOTHROW(r.d.on_handler_reply(0, {{"id", 999}, {"ok", true}}));
  CHECK(r.d.counters().tasks_done == 0);
}

// --- the handler pool, with tiny shell handlers ----------------------------

namespace {

struct PoolEvents : HandlerPool::Listener {
  std::vector<int> ready, lost;
  std::vector<std::pair<int, Json>> replies;
  void handler_ready(int h, const Json&) override { ready.push_back(h); }
  void handler_reply(int h, const Json& r) override { replies.emplace_back(h, r); }
  void handler_lost(int h, const std::string&) override { lost.push_back(h); }
};

// Answers every line with {"id": <its line number>, "ok": true}, like handler.py's shape.
const char* k_echo_handler = R"(echo '{"event":"ready","pid":'$$',"python":"sh","lithops":"none"}'; n=0; )"
                             R"(while read -r line; do n=$((n+1)); echo '{"id":'$n',"ok":true}'; done)";

template <class Pred>
bool pump_until(HandlerPool& pool, Pred pred, std::chrono::milliseconds limit = std::chrono::milliseconds(10000)) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) {
      return false;
    }
    std::vector<pollfd> fds;
    std::vector<int> tags;
    pool.add_pollfds(fds, tags);
    ::poll(fds.data(), fds.size(), 20);
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents) {
        pool.handle(tags[i], fds[i].revents);
      }
    }
    pool.tick();
  }
  return true;
}

}  // namespace

TEST_CASE("the pool starts handlers, feeds them lines and restarts one that dies") {
  PoolEvents ev;
  PoolOptions po;
  po.backoff_first = std::chrono::milliseconds(1);
  HandlerPool pool(
      2,
      [](int) {
        return HandlerCommand{{"sh", "-c", k_echo_handler}, Env::current()};
      },
      po, ev);
  pool.start();
  REQUIRE(pump_until(pool, [&] { return ev.ready.size() == 2; }));
  pool.send(1, "{\"id\":1}\n");
  REQUIRE(pump_until(pool, [&] { return ev.replies.size() == 1; }));
  CHECK(ev.replies[0].first == 1);
  CHECK(ev.replies[0].second["ok"] == true);
  ::kill(pool.pid(0), SIGKILL);
  REQUIRE(pump_until(pool, [&] { return ev.lost.size() == 1 && ev.ready.size() == 3; }));
  CHECK(ev.lost[0] == 0);
  CHECK(pool.restarts() == 1);
  CHECK(pool.ready(0));
  pool.stop(std::chrono::milliseconds(2000));
  CHECK(pool.ready_count() == 0);
}

TEST_CASE("a handler that never gets ready makes the pool fail after restart_limit tries") {
  PoolEvents ev;
  PoolOptions po;
  po.backoff_first = std::chrono::milliseconds(1);
  po.backoff_max = std::chrono::milliseconds(2);
  po.restart_limit = 2;
  HandlerPool pool(
      1,
      [](int) {
        return HandlerCommand{{"sh", "-c", "echo not ready >&2; exit 3"}, Env::current()};
      },
      po, ev);
  pool.start();
  REQUIRE(pump_until(pool, [&] { return pool.failed(); }));
  CHECK(ev.ready.empty());
  CHECK(ev.lost.empty());  // it never ran anything: nothing for the dispatcher to requeue
  CHECK(pool.last_error().find("exited with code 3") != std::string::npos);
}

TEST_CASE("a handler that dies right after its ready line is restarted ever more slowly, then the pool fails") {
  PoolOptions po;
  po.backoff_first = std::chrono::milliseconds(100);
  po.backoff_max = std::chrono::milliseconds(1000);
  po.restart_limit = 3;
  const char* dies_when_ready = R"(echo '{"event":"ready","pid":'$$',"python":"sh","lithops":"none"}'; exit 0)";
  std::vector<std::chrono::steady_clock::time_point> readies;
  struct Stamp : PoolEvents {
    std::vector<std::chrono::steady_clock::time_point>& at;
    explicit Stamp(std::vector<std::chrono::steady_clock::time_point>& a) : at(a) {}
    void handler_ready(int h, const Json& j) override {
      at.push_back(std::chrono::steady_clock::now());
      PoolEvents::handler_ready(h, j);
    }
  } stamp(readies);
  HandlerPool timed(
      1,
      [&](int) {
        return HandlerCommand{{"sh", "-c", dies_when_ready}, Env::current()};
      },
      po, stamp);
  timed.start();
  REQUIRE(pump_until(
      timed, [&] { return timed.failed(); }, std::chrono::milliseconds(20000)));
  // The first run and restart_limit restarts, never more.
  CHECK(stamp.ready.size() == 4);
  CHECK(timed.restarts() == 3);
  CHECK(timed.last_error().find("control handler died 4 times within 60 s") != std::string::npos);
  // Each restart waited the backoff: 100, 200, 400 ms.
  REQUIRE(readies.size() == 4);
  for (std::size_t i = 1; i < readies.size(); ++i) {
    auto gap = std::chrono::duration_cast<std::chrono::milliseconds>(readies[i] - readies[i - 1]).count();
    CHECK(gap >= 100LL << (i - 1));
  }
}

TEST_CASE(
    "with retire_slots a slot handler past the limit is taken out of service alone, the last one fails the pool") {
  struct Retired : PoolEvents {
    std::vector<std::pair<int, std::string>> retired;
    void handler_retired(int h, const std::string& why) override { retired.emplace_back(h, why); }
  } ev;
  PoolOptions po;
  po.backoff_first = std::chrono::milliseconds(1);
  po.backoff_max = std::chrono::milliseconds(2);
  po.restart_limit = 1;
  po.retire_slots = true;
  // Slot 0 dies as soon as it is up; slot 1 and the control handler (2) live.
  auto command = [](int h) { return HandlerCommand{{"sh", "-c", h == 0 ? "exit 7" : k_echo_handler}, Env::current()}; };
  HandlerPool pool(3, command, po, ev);
  pool.start();
  REQUIRE(pump_until(pool, [&] { return !ev.retired.empty() && pool.ready_count() == 2; }));
  CHECK_FALSE(pool.failed());
  CHECK(ev.retired.size() == 1);
  CHECK(ev.retired[0].first == 0);
  CHECK(ev.retired[0].second.find("died 2 times within 60 s") != std::string::npos);
  CHECK(pool.retired_why(0) == ev.retired[0].second);
  CHECK(pool.retired_why(1).empty());
  CHECK(pool.ready(1));
  // Slot 1 going the same way leaves no slot: the pool fails.
  pid_t first = pool.pid(1);
  ::kill(first, SIGKILL);
  REQUIRE(pump_until(pool, [&] { return pool.ready(1) && pool.pid(1) != first; }));
  ::kill(pool.pid(1), SIGKILL);
  REQUIRE(pump_until(pool, [&] { return pool.failed(); }));
  CHECK(pool.last_error().find("every slot is out of service") != std::string::npos);
  pool.stop(std::chrono::milliseconds(2000));
}

// --- amqp helpers ----------------------------------------------------------

TEST_CASE("header values are read leniently") {
  amqp::Table t{{"n", std::int64_t{2}}, {"s", std::string("7")}, {"x", std::string("no")}, {"b", true}};
  CHECK(amqp::table_int(t, "n") == 2);
  CHECK(amqp::table_int(t, "s") == 7);  // a crash count set by a client that wrote it as text
  CHECK(amqp::table_int(t, "x", -1) == -1);
  CHECK(amqp::table_int(t, "missing", 5) == 5);
  CHECK(amqp::table_string(t, "n") == "2");
  CHECK(amqp::table_string(t, "b").empty());
}

TEST_CASE("an action is named as the message spells it, and a value outside the table as every enum's is") {
  CHECK(k_action_names.text(Action::get_metadata) == "get_metadata");
  CHECK(k_action_names.parse("send_task") == Action::send_task);
  CHECK_FALSE(k_action_names.parse("Send_task"));
  CHECK(k_action_names.text(static_cast<Action>(7)) == "unknown");
}

// --- runtimes ------------------------------------------------------------------

namespace {

Json job_of(const std::string& runtime, int calls = 1, const std::string& key = "J1") {
  Json j = job(calls, key);
  j["runtime_name"] = runtime;
  j["runtime_memory"] = 512;
  return j;
}

Json metadata_request(const std::string& runtime_name) {
  return {{"runtime_name", runtime_name}, {"log_level", 20}, {"storage_bucket", "b"}};
}

std::uint64_t deliver_from(Rig& r, const std::string& body, const std::string& exchange, const std::string& rk) {
  amqp::Delivery del;
  del.tag = r.next_tag++;
  del.exchange = exchange;
  del.routing_key = rk;
  del.body = body;
  auto tag = del.tag;
  r.d.on_delivery(std::move(del));
  return tag;
}

}  // namespace

TEST_CASE("SHA-1 and the client's job names are Python's") {
  CHECK(sha1_hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  CHECK(sha1_hex("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d");
  CHECK(sha1_hex(std::string(1000, 'a')) == "291e9a6c66994949b57ba5e650361e98fc36b1ba");
  // Printed by Lithops 3.7's _format_job_name (hashlib) for these arguments.
  CHECK(lithops_job_name("lithops-rt", 128, "3.7.1.dev0") == "lithops-worker-371dev0-a87d2a9a33");
  CHECK(lithops_job_name("my-torch-rt", 128, "3.7.0") == "lithops-worker-370-bbfc614d9c");
}

TEST_CASE("a get_metadata's runtime_name is told apart per runtime, runtimes with '-' included") {
  // The hashed form the client sends, whatever its Lithops version.
  CHECK(metadata_name_is("lithops-worker-371dev0-a87d2a9a33", "lithops-rt"));
  CHECK(metadata_name_is("lithops-worker-370-bbfc614d9c", "my-torch-rt"));
  CHECK(metadata_name_is(lithops_job_name("rt", 128, "3.10.2"), "rt"));
  CHECK_FALSE(metadata_name_is("lithops-worker-371dev0-a87d2a9a33", "lithops"));
  CHECK_FALSE(metadata_name_is("lithops-worker-371dev0-a87d2a9a33", "lithops-rt-128"));
  CHECK_FALSE(metadata_name_is(lithops_job_name("rt", 256, "3.7.0"), "rt"));  // the client's is 128
  CHECK_FALSE(metadata_name_is("lithops-worker-371dev0-nothex", "lithops-rt"));
  // The plain form: <runtime>-<memory>-<version>.
  CHECK(plain_metadata_runtime("lithops-rt-128-3.7.1.dev0") == std::optional<std::string>("lithops-rt"));
  CHECK(plain_metadata_runtime("my-torch-rt-2048-3.7.0") == std::optional<std::string>("my-torch-rt"));
  CHECK(plain_metadata_runtime("rt-12x-3.7.0") == std::nullopt);
  CHECK(plain_metadata_runtime("-128-3.7.0") == std::nullopt);
  CHECK(plain_metadata_runtime("rt-128-") == std::nullopt);
  CHECK(plain_metadata_runtime("rt") == std::nullopt);
  CHECK(metadata_name_is("my-torch-rt-128-3.7.0", "my-torch-rt"));
  CHECK_FALSE(metadata_name_is("my-torch-rt-128-3.7.0", "my-torch"));
  CHECK_FALSE(metadata_name_is("my-torch-rt-128-3.7.0", "torch-rt"));
  CHECK_FALSE(metadata_name_is("anything", ""));
}

TEST_CASE("a deployment runs its own runtime's tasks and those that name no runtime") {
  Rig r(2, nullptr, "rt-a");
  auto own = r.deliver(encode(Action::send_task, job_of("rt-a", 1, "A")));
  auto none = r.deliver(encode(Action::send_task, job(1, "N")));
  REQUIRE(r.handlers.sent.size() == 2);
  CHECK(r.broker.published.empty());
  r.reply(0);
  r.reply(1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{own, none});
  CHECK(r.d.counters().moved == 0);
  // A deployment without a runtime runs everything, as before runtimes.
  Rig any(1);
  any.deliver(encode(Action::send_task, job_of("rt-b")));
  CHECK(any.handlers.sent.size() == 1);
  CHECK(any.broker.published.empty());
}

TEST_CASE("a task for another runtime is moved to that runtime's queue, acked only once the copy is confirmed") {
  Rig r(2, nullptr, "rt-a");
  amqp::Properties props;
  props.message_id = "m1";
  props.headers[k_hdr_crashes] = std::int64_t{1};
  auto body = encode(Action::send_task, job_of("rt-b", 3, "B"));
  auto tag = r.deliver(body, props);
  CHECK(r.handlers.sent.empty());  // never run here
  REQUIRE(r.broker.published.size() == 1);
  const auto& p = r.broker.published[0];
  CHECK(p.routing_key == "task_queue.runtime.rt-b");
  CHECK(p.body == body);  // as delivered: not split, not rewritten
  CHECK(p.props.delivery_mode == 2);
  CHECK(p.props.message_id == "m1");
  CHECK(amqp::table_int(p.props.headers, k_hdr_crashes, 0) == 1);
  // Declared before the publish.
  CHECK(r.broker.events ==
        std::vector<std::string>{"declare task_queue.runtime.rt-b", "publish task_queue.runtime.rt-b"});
  CHECK(r.broker.acked.empty());
  // Held until confirmed: the reserve is free again for the next message.
  CHECK(r.d.prefetch() == 2 + 1 + 1);
  r.deliver(encode(Action::send_task, job_of("rt-b", 1, "B2")));
  // Declared again before each move: a queue deleted in between (lithops
  // clean) must not take a confirmed publish into nothing.
  CHECK(std::count(r.broker.events.begin(), r.broker.events.end(), "declare task_queue.runtime.rt-b") == 2);
  r.d.on_confirm({r.broker.published[0].seq, true});
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.d.counters().moved == 2);
  CHECK(r.d.counters().tasks_done == 0);
  // After a reconnect the queue is declared again before the next move.
  r.d.on_disconnected();
  r.d.on_connected(r.d.desired_prefetch(), r.d.desired_slot_consumer());
  r.broker.events.clear();
  r.deliver(encode(Action::send_task, job_of("rt-b", 1, "B3")));
  CHECK(r.broker.events.front() == "declare task_queue.runtime.rt-b");
}

TEST_CASE("a move the broker refuses gives the original back to the queue, never loses it") {
  Rig r(1, nullptr, "rt-a");
  auto tag = r.deliver(encode(Action::send_task, job_of("rt-b")));
  REQUIRE(r.broker.published.size() == 1);
  r.d.on_confirm({r.broker.published[0].seq, false});
  CHECK(r.broker.acked.empty());
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{tag});
  CHECK(r.d.idle());
  // A connection lost before the confirm: neither acked nor rejected, the
  // broker has the original again and redelivers it.
  auto tag2 = r.deliver(encode(Action::send_task, job_of("rt-b")));
  r.d.on_disconnected();
  CHECK(r.d.idle());
  r.d.on_connected(r.d.desired_prefetch(), r.d.desired_slot_consumer());
  r.confirm_all();  // sequence numbers of the old channel: ignored
  CHECK(r.broker.acked.empty());
  CHECK(r.broker.requeued == std::vector<std::uint64_t>{tag});
  (void)tag2;
}

TEST_CASE("get_metadata for another runtime goes to every runtime's queue; a copy not ours is dropped") {
  Rig r(1, nullptr, "rt-a");
  auto mine = r.deliver(encode(Action::get_metadata, metadata_request(lithops_job_name("rt-a", 128, "3.7.0"))));
  REQUIRE(r.handlers.sent.size() == 1);
  CHECK(r.handlers.sent[0].handler == r.d.control());
  r.reply(r.d.control());
  CHECK(r.broker.acked == std::vector<std::uint64_t>{mine});
  // Another runtime's: its runtime cannot be read from the hash, so a copy
  // goes to every runtime's queue through the fanout.
  auto body = encode(Action::get_metadata, metadata_request(lithops_job_name("rt-b", 128, "3.7.0")));
  auto theirs = r.deliver(body);
  CHECK(r.handlers.sent.size() == 1);
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "exchange:task_queue.runtimes");
  CHECK(r.broker.published[0].body == body);
  CHECK(r.broker.published[0].props.expiration == k_metadata_copy_ttl_ms);
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{mine, theirs});
  // Our copy of it comes back through our runtime queue: dropped, not fanned out again.
  auto copy = deliver_from(r, body, "task_queue.runtimes", "");
  CHECK(r.broker.published.size() == 1);
  CHECK(r.handlers.sent.size() == 1);
  CHECK(r.broker.acked.back() == copy);
  // The copy of one that is ours, through the fanout: answered.
  deliver_from(r, encode(Action::get_metadata, metadata_request("rt-a-128-3.7.0")), "task_queue.runtimes", "");
  CHECK(r.handlers.sent.size() == 2);
  // Pings name no runtime: always answered.
  r.deliver(encode(Action::ping, Json::object()));
  CHECK(r.handlers.sent.size() == 3);
}

TEST_CASE("a task naming an invalid runtime is dead-lettered, never used in a queue name") {
  Rig r(1, nullptr, "rt-a");
  auto tag = r.deliver(encode(Action::send_task, job_of("../x y")));
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue.dead");
  CHECK(amqp::table_string(r.broker.published[0].props.headers, k_hdr_reason).find("invalid runtime_name") == 0);
  CHECK(std::none_of(r.broker.events.begin(), r.broker.events.end(),
                     [](const std::string& e) { return e.starts_with("declare"); }));
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  CHECK(r.handlers.sent.empty());
}

TEST_CASE("a split or crashed task from the runtime's queue goes back to that queue") {
  Rig r(1, nullptr, "rt-a");
  deliver_from(r, encode(Action::send_task, job_of("rt-a", 2, "S")), "", "task_queue.runtime.rt-a");
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue.runtime.rt-a");
  r.confirm_all();
  r.d.on_handler_lost(0, "killed");
  REQUIRE(r.broker.published.size() == 2);
  CHECK(r.broker.published[1].routing_key == "task_queue.runtime.rt-a");
  // From the task queue: back to the task queue, as before.
  Rig t(1, nullptr, "rt-a");
  t.deliver(encode(Action::send_task, job_of("rt-a", 2, "T")));
  REQUIRE(t.broker.published.size() == 1);
  CHECK(t.broker.published[0].routing_key == "task_queue");
}

TEST_CASE("runtime_memory caps the slots in use at the rank's memory divided by it") {
  CHECK(memory_slot_cap(8, 4096, 1024) == 4);
  CHECK(memory_slot_cap(2, 4096, 1024) == 2);
  CHECK(memory_slot_cap(8, 4096, 5000) == 0);
  CHECK(memory_slot_cap(8, 0, 1024) == 8);  // memory unknown
  CHECK(memory_slot_cap(8, 4096, 0) == 8);  // runtime_memory not given
  Rig r(4, nullptr, "rt-a", 2048);
  auto big = [](const std::string& key, int calls) {
    Json j = job_of("rt-a", calls, key);
    j["runtime_memory"] = 1024;
    return j;
  };
  // 4 calls, 4 slots, but only 2 x 1024 MiB fit: 2 run, 2 are republished.
  r.deliver(encode(Action::send_task, big("M", 4)));
  CHECK(r.d.slot_cap() == 2);
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue");
  r.confirm_all();
  CHECK(r.d.busy_slots() == 2);
  CHECK(r.d.desired_prefetch() == 0 + 1 + 1);  // no free slot: the message held, and the reserve
  r.deliver(encode(Action::send_task, big("M2", 1)));
  CHECK(r.d.busy_slots() == 2);  // waits in the reserve although 2 slots are idle
  r.reply(0);
  CHECK(r.d.busy_slots() == 2);  // the waiting one took the freed place
  // A runtime that needs more than the rank has fails clearly: dead-lettered with the reason.
  Json huge = job_of("rt-a", 1, "H");
  huge["runtime_memory"] = 4096;
  auto tag = r.deliver(encode(Action::send_task, huge));
  auto& dead = r.broker.published.back();
  CHECK(dead.routing_key == "task_queue.dead");
  CHECK(amqp::table_string(dead.props.headers, k_hdr_reason).find("runtime_memory 4096 MiB exceeds the 2048 MiB") == 0);
  r.d.on_confirm({dead.seq, true});
  CHECK(r.broker.acked.back() == tag);
  CHECK(r.d.slot_cap() == 2);
}

TEST_CASE(
    "a runtime queue nobody consumes is told to the autoalloc controller, once per interval; never for a consumed "
    "one") {
  Rig r(1, nullptr, "rt-a");
  auto t0 = Dispatcher::Clock::now();
  r.deliver(encode(Action::send_task, job_of("rt-b", 1, "B")));
  // Consumed (a deployment of rt-b): nothing more than the move, no round trip waited for.
  r.d.on_declared("task_queue.runtime.rt-b", 1, t0);
  CHECK(r.broker.published.size() == 1);
  // Not consumed: one notice, an empty body naming the runtime, to its own exchange.
  r.d.on_declared("task_queue.runtime.rt-b", 0, t0);
  REQUIRE(r.broker.published.size() == 2);
  const auto& n = r.broker.published[1];
  CHECK(n.routing_key == "exchange:task_queue.runtimes.wanted");
  CHECK(n.body.empty());
  CHECK(amqp::table_string(n.props.headers, k_hdr_wanted_runtime) == "rt-b");
  CHECK(r.broker.events[r.broker.events.size() - 2] == "declare exchange task_queue.runtimes.wanted");
  // Rate-limited per runtime; another runtime is told at once.
  r.d.on_declared("task_queue.runtime.rt-b", 0, t0 + std::chrono::seconds(k_wanted_notice_interval_s - 1));
  CHECK(r.broker.published.size() == 2);
  r.d.on_declared("task_queue.runtime.rt-c", 0, t0 + std::chrono::seconds(1));
  CHECK(r.broker.published.size() == 3);
  r.d.on_declared("task_queue.runtime.rt-b", 0, t0 + std::chrono::seconds(k_wanted_notice_interval_s));
  CHECK(r.broker.published.size() == 4);
  // Other queues (the task queue, the dead-letter queue): never.
  r.d.on_declared("task_queue.dead", 0, t0 + std::chrono::hours(1));
  r.d.on_declared("task_queue", 0, t0 + std::chrono::hours(1));
  CHECK(r.broker.published.size() == 4);
}

TEST_CASE("a notice that reaches a deployment is acked and dropped, never parsed nor run") {
  Rig r(1, nullptr, "rt-a");
  amqp::Properties p;
  p.headers[k_hdr_wanted_runtime] = std::string("rt-a");
  auto tag = r.deliver("", p);
  CHECK(r.handlers.sent.empty());
  CHECK(r.broker.published.empty());  // not dead-lettered as an empty body would be
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
  // Even with a body that is a valid get_metadata of its own runtime.
  auto tag2 =
      deliver_from(r, encode(Action::get_metadata, metadata_request("rt-a-128-3.7.0")), "task_queue.runtimes", "");
  CHECK(r.handlers.sent.size() == 1);  // (without the header: answered)
  (void)tag2;
  amqp::Delivery del;
  del.tag = 99;
  del.body = encode(Action::get_metadata, metadata_request("rt-a-128-3.7.0"));
  del.props = p;
  r.d.on_delivery(std::move(del));
  CHECK(r.handlers.sent.size() == 1);
  CHECK(r.broker.acked.back() == 99);
}
