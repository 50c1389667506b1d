// The Lithops task protocol and the dispatcher's rules, without a broker or
// processes: decode/classify, split, one-call payloads, and the state machine
// driven through fake broker and handler ports.
#include <doctest/doctest.h>

#include <map>
#include <string>
#include <vector>

#include <signal.h>

#include <chrono>
#include <thread>

#include "dispatch/dispatcher.h"
#include "dispatch/handler_pool.h"
#include "dispatch/protocol.h"

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
  return {{"job_key", key},     {"call_ids", ids},      {"data_byte_ranges", ranges},
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
  CHECK_FALSE(base64_decode("Zm9"));                             // missing padding
  CHECK_FALSE(base64_decode("Zm9v!!=="));                        // not in the alphabet
  CHECK_FALSE(base64_decode("Zg==Zg=="));                        // padding in the middle
  CHECK_FALSE(base64_decode("Z==="));
  CHECK_FALSE(base64_decode("-_8="));                            // urlsafe alphabet is not Lithops'
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

TEST_CASE("splitting keeps the same indices of call_ids and data_byte_ranges") {
  auto p = job(5);
  auto [kept, rest] = split(p, 2);
  CHECK(kept["call_ids"] == Json::array({"00000", "00001"}));
  CHECK(kept["data_byte_ranges"] == Json::array({Json::array({0, 9}), Json::array({10, 19})}));
  CHECK(kept["total_calls"] == 2);
  CHECK(rest["call_ids"] == Json::array({"00002", "00003", "00004"}));
  CHECK(rest["data_byte_ranges"][0] == Json::array({20, 29}));
  CHECK(rest["total_calls"] == 3);
  CHECK(rest["job_key"] == "J1");
  CHECK(rest["config"] == p["config"]);
  // Both halves are valid messages again.
  CHECK(std::get<Task>(decode(encode(Action::send_task, rest))).calls == 3);
}

TEST_CASE("handlers get one call per payload with worker_processes = 1") {
  auto calls = one_call_payloads(job(3));
  REQUIRE(calls.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(calls[i]["total_calls"] == 1);
    CHECK(calls[i]["worker_processes"] == 1);
    CHECK(calls[i]["call_ids"].size() == 1);
    CHECK(calls[i]["data_byte_ranges"][0][0] == static_cast<int>(i * 10));
  }
  CHECK(calls[2]["call_ids"][0] == "00002");
  CHECK(describe_calls(job(3)) == "J1/00000..00002 (3 calls)");
}

TEST_CASE("prefetch: one per free slot, one per started message, one lookahead") {
  CHECK(prefetch_for(4, 0) == 5);  // idle node with 4 slots
  CHECK(prefetch_for(0, 4) == 5);  // 4 single-call tasks running
  CHECK(prefetch_for(0, 1) == 2);  // one 4-call message holds every slot
  CHECK(prefetch_for(0, 0) == 1);
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
  void set_prefetch(int n) override { prefetches.push_back(n); }
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
  explicit Rig(int slots) : d({.slots = slots, .queue = "task_queue", .rank = 3, .node = "n7"}, broker, handlers) {
    handlers.events = &broker.events;
    for (int h = 0; h < d.handlers(); ++h) {
      d.on_handler_ready(h);
    }
    d.on_connected(d.desired_prefetch());
  }
  std::uint64_t deliver(const std::string& body, amqp::Properties props = {}) {
    amqp::Delivery del;
    del.tag = next_tag++;
    del.routing_key = "task_queue";
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
  auto t3 = r.deliver(encode(Action::send_task, job(1, "C")));  // the lookahead: no slot free
  CHECK(r.handlers.sent.size() == 2);
  CHECK(r.d.busy_slots() == 2);
  CHECK(r.broker.acked.empty());
  CHECK(r.handlers.sent[0].request["payload"]["worker_processes"] == 1);
  r.reply(1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{t2});
  // The freed slot takes the waiting message at once.
  REQUIRE(r.handlers.sent.size() == 3);
  CHECK(r.handlers.sent[2].handler == 1);
  CHECK(r.handlers.sent[2].request["payload"]["job_key"] == "C");
  r.reply(0);
  r.reply(1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{t2, t1, t3});
  CHECK(r.d.counters().tasks_done == 3);
  CHECK(r.d.idle());
  CHECK(r.broker.published.empty());
  CHECK(r.broker.prefetches.empty());  // single-call messages: always slots + 1
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
  // While one 2-call message held both slots the prefetch dropped to 2, then back to 3.
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

TEST_CASE("get_metadata and ping never wait behind tasks") {
  Rig r(1);
  r.deliver(encode(Action::send_task, job(1, "A")));
  r.deliver(encode(Action::send_task, job(1, "B")));  // waits: the only slot is busy
  amqp::Properties pp;
  pp.reply_to = "amq.gen-reply";
  pp.correlation_id = "c-1";
  auto ping = r.deliver(encode(Action::ping, {{"seq", 1}}), pp);
  auto meta = r.deliver(encode(Action::get_metadata, {{"runtime_name", "rt"}}));
  REQUIRE(r.handlers.sent.size() == 3);
  CHECK(r.handlers.sent[1].handler == r.d.control());
  CHECK(r.handlers.sent[1].request["action"] == "ping");
  CHECK(r.handlers.sent[2].handler == r.d.control());
  CHECK(r.handlers.sent[2].request["action"] == "get_metadata");
  // Answer the ping (the first outstanding control request).
  Json req = r.handlers.sent[1].request;
  r.d.on_handler_reply(r.d.control(), {{"id", req["id"]}, {"ok", true}, {"echo", req["payload"]}});
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "amq.gen-reply");
  CHECK(r.broker.published[0].props.correlation_id == "c-1");
  auto reply = Json::parse(r.broker.published[0].body);
  CHECK(reply["rank"] == 3);
  CHECK(reply["node"] == "n7");
  CHECK(reply["echo"]["seq"] == 1);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{ping});
  r.reply(r.d.control());
  CHECK(r.broker.acked == std::vector<std::uint64_t>{ping, meta});
  CHECK(r.d.counters().pings == 1);
  CHECK(r.d.counters().metadata == 1);
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
  r.d.on_connected(r.d.desired_prefetch());
  auto tag = r.deliver(encode(Action::send_task, job(1)));
  r.reply(0);
  CHECK(r.broker.acked == std::vector<std::uint64_t>{tag});
}

TEST_CASE("tasks wait for handlers that are not ready yet") {
  FakeBroker b;
  FakeHandlers h;
  Dispatcher d({.slots = 2}, b, h);
  d.on_connected(d.desired_prefetch());
  amqp::Delivery del;
  del.tag = 1;
  del.body = encode(Action::send_task, job(1));
  d.on_delivery(del);
  CHECK(h.sent.empty());
  d.on_handler_ready(1);
  REQUIRE(h.sent.size() == 1);
  CHECK(h.sent[0].handler == 1);
}

TEST_CASE("with every slot busy the lookahead task is rotated so a get_metadata behind it is reached") {
  Rig r(1);
  auto running = r.deliver(encode(Action::send_task, job(1, "RUN")));
  auto lookahead = r.deliver(encode(Action::send_task, job(1, "LOOK")));
  auto now = Dispatcher::Clock::now();
  REQUIRE(r.d.next_deadline());
  r.d.on_tick(now);  // not waited long enough yet
  CHECK(r.broker.published.empty());
  r.d.on_tick(now + std::chrono::seconds(1));
  REQUIRE(r.broker.published.size() == 1);
  CHECK(r.broker.published[0].routing_key == "task_queue");
  CHECK(std::get<Task>(decode(r.broker.published[0].body)).payload["job_key"] == "LOOK");
  CHECK(r.broker.published[0].props.delivery_mode == 2);
  r.d.on_tick(now + std::chrono::seconds(2));  // one rotation at a time
  CHECK(r.broker.published.size() == 1);
  r.confirm_all();
  CHECK(r.broker.acked == std::vector<std::uint64_t>{lookahead});
  CHECK(r.d.counters().rotations == 1);
  // What the broker hands over next, the get_metadata, runs at once.
  r.deliver(encode(Action::get_metadata, {{"runtime_name", "rt"}}));
  CHECK(r.handlers.sent.back().handler == r.d.control());
  r.reply(0);
  CHECK(r.broker.acked.back() == running);
}

TEST_CASE("no rotation while a slot is free, restarting, or while draining") {
  Rig r(2);
  r.deliver(encode(Action::send_task, job(1)));
  r.d.on_tick(Dispatcher::Clock::now() + std::chrono::seconds(5));
  CHECK(r.broker.published.empty());
  CHECK_FALSE(r.d.next_deadline());
  // Slot 1's handler is being restarted: the waiting task is for it.
  r.d.on_handler_lost(1, "exited with code 1");
  r.deliver(encode(Action::send_task, job(1, "W")));
  r.d.on_tick(Dispatcher::Clock::now() + std::chrono::seconds(5));
  CHECK(r.broker.published.empty());
  r.d.on_handler_ready(1);
  CHECK(r.handlers.sent.back().request["payload"]["job_key"] == "W");
  // Draining: the lookahead goes back at once instead.
  r.deliver(encode(Action::send_task, job(1, "X")));
  r.d.drain();
  r.d.on_tick(Dispatcher::Clock::now() + std::chrono::seconds(5));
  CHECK(r.broker.published.empty());
  CHECK(r.broker.requeued.size() == 1);
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
const char* k_echo_handler =
    R"(echo '{"event":"ready","pid":'$$',"python":"sh","lithops":"none"}'; n=0; )"
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
  HandlerPool pool(2, [](int) { return HandlerCommand{{"sh", "-c", k_echo_handler}, Env::current()}; }, po, ev);
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
  HandlerPool pool(1, [](int) { return HandlerCommand{{"sh", "-c", "echo not ready >&2; exit 3"}, Env::current()}; },
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
  HandlerPool timed(1, [&](int) { return HandlerCommand{{"sh", "-c", dies_when_ready}, Env::current()}; }, po,
                    stamp);
  timed.start();
  REQUIRE(pump_until(timed, [&] { return timed.failed(); }, std::chrono::milliseconds(20000)));
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
