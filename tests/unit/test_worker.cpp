// One node's worker through its lifecycle, without a broker or a container
// engine: a fake engine (its "instance" is a flag; the handlers and the
// runscript it runs are tiny shell scripts) and a fake broker connector
// behind worker/broker.h's ports. Real processes, real poll(): each case
// takes milliseconds.
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dispatch/protocol.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"
#include "worker/broker.h"
#include "worker/instance.h"
#include "worker/worker.h"

using namespace lhpc;
using namespace lhpc::worker;
using std::chrono::milliseconds;

namespace {

// What the fake engine did, shared with the test.
struct InstanceSide {
  bool alive = false;
  int starts = 0;
  int stops = 0;
  std::vector<std::string> started_names;
  std::vector<std::string> binds;
  std::string gpu;  // the GPU switches of the last instance start, joined by spaces
  int execs = 0;    // handler command lines asked for
  int runs = 0;     // runscript command lines asked for
};

class FakeEngine final : public container::Engine {
public:
  FakeEngine(std::shared_ptr<InstanceSide> side, std::string handler, std::string runscript)
      : m_side(std::move(side)), m_handler(std::move(handler)), m_runscript(std::move(runscript)) {}
  config::Engine kind() const override { return config::Engine::singularity; }
  std::string name() const override { return "fake"; }
  std::string binary() const override { return ""; }
  std::vector<std::string> build_argv(const std::string&, const std::string&, bool, bool) const override { return {}; }
  std::vector<std::string> instance_start_argv(const container::InstanceSpec&) const override { return {}; }
  std::vector<std::string> instance_stop_argv(const std::string&, bool, int) const override { return {}; }
  std::vector<std::string> instance_list_argv(const std::string&) const override { return {}; }
  std::vector<std::string> exec_argv(const std::string&, const std::vector<std::string>&) const override {
    ++m_side->execs;
    return {"sh", "-c", m_handler};
  }
  std::vector<std::string> run_argv(const std::string&) const override {
    ++m_side->runs;
    return {"sh", "-c", m_runscript};
  }
  container::EngineFeatures features() const override { return {}; }
  void set_version(const std::string&) override {}
  Env child_env(const Env& base, const std::map<std::string, std::string>& vars) const override {
    Env e = base;
    for (const auto& [k, v] : vars) {
      e.set(k, v);
    }
    return e;
  }
  void start_instance(const container::InstanceSpec& spec) override {
    m_side->alive = true;
    ++m_side->starts;
    m_side->started_names.push_back(spec.name);
    m_side->binds = spec.binds;
    m_side->gpu.clear();
    for (const auto& f : spec.gpu) {
      m_side->gpu += (m_side->gpu.empty() ? "" : " ") + f;
    }
  }
  bool instance_alive(const std::string&) override { return m_side->alive; }
  void stop_instance(const std::string&, milliseconds) override {
    m_side->alive = false;
    ++m_side->stops;
  }

private:
  std::shared_ptr<InstanceSide> m_side;
  std::string m_handler, m_runscript;
};

// The broker as the fake link shows it to the test.
struct BrokerSide {
  std::vector<Subscription> subscriptions;  // one per connection attempt
  std::deque<amqp::Delivery> to_deliver;
  std::vector<std::uint64_t> acked;
  std::vector<std::uint64_t> requeued;
  std::vector<std::string> cancelled;
  std::vector<amqp::CancelledConsumer> to_cancel;  // the broker cancels these at the next pump
  std::vector<std::string> declared;               // queues and exchanges, in order
  std::vector<std::string> bound;                  // "queue > exchange"
  std::vector<std::string> consumed;               // "queue tag", in order
  std::uint64_t seq = 0;
  std::vector<std::uint64_t> unconfirmed;
  bool open = false;
  std::uint64_t next_tag = 1;

  std::uint64_t deliver(const std::string& body) {
    amqp::Delivery d;
    d.tag = next_tag++;
    d.routing_key = "task_queue";
    d.body = body;
    to_deliver.push_back(d);
    return d.tag;
  }
};

class FakeLink final : public BrokerLink {
public:
  explicit FakeLink(std::shared_ptr<BrokerSide> side) : m_side(std::move(side)) { m_side->open = true; }
  ~FakeLink() override { m_side->open = false; }
  int fd() const override { return -1; }  // poll() skips it: buffered() says when to pump
  bool buffered() const override { return !m_side->to_deliver.empty() || !m_side->to_cancel.empty(); }
  const std::string& redacted_url() const override { return m_url; }
  void pump(bool) override {}
  bool next_delivery(amqp::Delivery& out) override {
    if (m_side->to_deliver.empty()) {
      return false;
    }
    out = m_side->to_deliver.front();
    m_side->to_deliver.pop_front();
    return true;
  }
  std::vector<amqp::Confirm> take_confirms() override {
    std::vector<amqp::Confirm> c;
    for (auto s : m_side->unconfirmed) {
      c.push_back({s, true});
    }
    m_side->unconfirmed.clear();
    return c;
  }
  std::vector<amqp::CancelledConsumer> take_cancelled() override { return std::exchange(m_side->to_cancel, {}); }
  bool blocked() const override { return false; }
  std::optional<amqp::BrokerClose> closed() const override { return std::nullopt; }
  void set_max_body(std::uint64_t) override {}
  void declare_queue_async(const std::string& q, bool, bool) override { m_side->declared.push_back(q); }
  void declare_exchange_async(const std::string& x, const std::string&) override { m_side->declared.push_back(x); }
  void bind_queue_async(const std::string& q, const std::string& x) override { m_side->bound.push_back(q + " > " + x); }
  void ack(std::uint64_t tag) override { m_side->acked.push_back(tag); }
  void reject(std::uint64_t tag, bool requeue) override {
    if (requeue) {
      m_side->requeued.push_back(tag);
    }
  }
  std::uint64_t publish(const std::string&, std::string_view, const amqp::Properties&) override {
    m_side->unconfirmed.push_back(++m_side->seq);
    return m_side->seq;
  }
  std::uint64_t publish_to_exchange(const std::string&, std::string_view, const amqp::Properties&) override {
    m_side->unconfirmed.push_back(++m_side->seq);
    return m_side->seq;
  }
  void qos_async(std::uint16_t) override {}
  std::string consume(const std::string& q, const amqp::ConsumeArgs& a) override {
    m_side->consumed.push_back(q + " " + a.tag);
    return a.tag;
  }
  void cancel_async(const std::string& tag) override { m_side->cancelled.push_back(tag); }

private:
  std::shared_ptr<BrokerSide> m_side;
  std::string m_url = "amqp://fake/";
};

class FakeConnector final : public BrokerConnector {
public:
  explicit FakeConnector(std::shared_ptr<BrokerSide> side) : m_side(std::move(side)) {}
  bool due(Clock::time_point) const override { return !m_pending; }
  bool connecting() const override { return m_pending.has_value(); }
  Clock::time_point next_attempt() const override { return {}; }
  void start(const Subscription& sub) override {
    m_side->subscriptions.push_back(sub);
    Result r;
    r.link = std::make_unique<FakeLink>(m_side);
    r.slot_tag = sub.slot_consumer ? sub.slot_tag : "";
    m_pending = std::move(r);
  }
  std::optional<Result> take() override {
    auto r = std::move(m_pending);
    m_pending.reset();
    return r;
  }
  milliseconds lost() override { return milliseconds(0); }

private:
  std::shared_ptr<BrokerSide> m_side;
  std::optional<Result> m_pending;
};

// A handler as handler.py behaves on its pipes: a ready line, then one
// answer per request, with the request's id. It notes "<role> <pid>" in
// `pids` and the role of each one given a request in `busy`, and holds each
// answer while the file `hold` exists.
std::string handler_script(const test::TempDir& dir) {
  return "echo \"$LITHOPS_HPC_HANDLER $$\" >> '" + dir.file("pids") +
         "'; "
         "echo \"$LITHOPS_HPC_HANDLER ${CUDA_VISIBLE_DEVICES-none} ${CUDA_DEVICE_ORDER-none}\" >> '" +
         dir.file("gpus") +
         "'; "
         R"(echo '{"event":"ready","pid":'$$',"python":"sh","lithops":"none"}'; )"
         R"(while read -r line; do id=${line#*\"id\":}; id=${id%%[,\}]*}; )"
         "echo \"$LITHOPS_HPC_HANDLER\" >> '" +
         dir.file("busy") +
         "'; "
         "while [ -e '" +
         dir.file("hold") +
         "' ]; do sleep 0.005; done; "
         R"(echo '{"id":'$id',"ok":true,"elapsed":0.01}'; done)";
}

dispatch::Json job(int calls) {
  dispatch::Json ids = dispatch::Json::array();
  dispatch::Json ranges = dispatch::Json::array();
  for (int i = 0; i < calls; ++i) {
    ids.push_back(std::to_string(i));
    ranges.push_back(dispatch::Json::array({i * 10, i * 10 + 9}));
  }
  return {{"job_key", "J"},       {"call_ids", ids},           {"data_byte_ranges", ranges},
          {"total_calls", calls}, {"worker_processes", calls}, {"config", {{"lithops", {{"backend", "singularity"}}}}}};
}

// A worker with fakes around it, in a private state directory.
struct Rig {
  test::TempDir dir{"worker"};
  test::EnvGuard state{"LITHOPS_HPC_STATE_DIR", dir.path + "/state"};
  std::shared_ptr<InstanceSide> instance = std::make_shared<InstanceSide>();
  std::shared_ptr<BrokerSide> broker = std::make_shared<BrokerSide>();
  config::Config cfg;
  std::unique_ptr<Worker> w;

  explicit Rig(config::Mode mode, std::function<void(config::Config&)> tune = {}, int slots = 1,
               std::optional<Env> gpu_env = std::nullopt) {
    cfg.deploy.mode = mode;
    cfg.rabbitmq.amqp_url = "amqp://guest:guest@localhost:5672/";
    cfg.logs.dir = dir.path + "/logs";
    cfg.deploy.restart_limit = 1;
    if (tune) {
      tune(cfg);
    }
    WorkerPorts ports;
    ports.engine = std::make_unique<FakeEngine>(instance, handler_script(dir), "echo runscript up; exec sleep 30");
    ports.broker = std::make_unique<FakeConnector>(broker);
    ports.instance_backoff = Backoff(milliseconds(1), milliseconds(2));
    ports.gpu_env = std::move(gpu_env);
    ports.gpu_root = dir.path + "/no-gpus";  // the node shows none: only gpu_env's GPUs count
    w = std::make_unique<Worker>(cfg, WorkerIdentity{.rank = 0, .node = "n1", .jobid = "J1", .slots = slots},
                                 std::move(ports));
  }

  // Steps the worker until `pred` holds; false after 10 s (a hang, not a timing).
  bool step_until(const std::function<bool()>& pred) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) {
        return false;
      }
      w->step(milliseconds(10));
    }
    return true;
  }
  bool consuming() {
    return step_until([&] { return w->stats().state == State::running && w->stats().broker_connected; });
  }
  void hold() { dir.write("hold", ""); }
  void release() { ::unlink(dir.file("hold").c_str()); }
  // Started, one held call running, then a drain requested: the set-up of the drain cases.
  // Returns the running call's delivery tag.
  std::uint64_t drain_with_one_call_running() {
    w->start("/images/runtime.sif");
    REQUIRE(consuming());
    hold();
    auto tag = broker->deliver(dispatch::encode(dispatch::Action::send_task, job(1)));
    REQUIRE(step_until([&] { return w->stats().slots_busy == 1; }));
    w->request_drain();
    return tag;
  }
  // The role of the handler given the last request.
  std::string busy_role() {
    std::ifstream in(dir.file("busy"));
    std::string r, last;
    while (in >> r) {
      last = r;
    }
    return last;
  }
  // Each handler start's "<role> <CUDA_VISIBLE_DEVICES> <CUDA_DEVICE_ORDER>", in order.
  std::vector<std::string> gpu_lines() {
    std::ifstream in(dir.file("gpus"));
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) {
      lines.push_back(line);
    }
    return lines;
  }
  // The newest process of a handler role ("0", "control").
  pid_t handler_pid(const std::string& role) {
    std::ifstream in(dir.file("pids"));
    std::string r;
    pid_t p = 0, found = 0;
    while (in >> r >> p) {
      if (r == role) {
        found = p;
      }
    }
    return found;
  }
};

}  // namespace

TEST_CASE("a dispatch worker starts its instance, is ready once a handler is, then consumes its queue") {
  Rig r(config::Mode::dispatch);
  CHECK(r.w->stats().state == State::starting);
  r.w->start("/images/runtime.sif");
  CHECK(r.instance->starts == 1);
  CHECK(r.instance->started_names == std::vector<std::string>{r.w->instance_name()});
  CHECK(r.w->instance_name() == sanitize_name(r.cfg.singularity.instance_name + "-J1-0"));
  REQUIRE(r.consuming());
  CHECK(r.instance->execs == 2);  // one slot and the control handler
  CHECK(r.instance->runs == 0);
  REQUIRE(r.broker->subscriptions.size() == 1);
  CHECK(r.broker->subscriptions[0].queue == "task_queue");
  CHECK(r.broker->subscriptions[0].rank_queue == dispatch::rank_queue("task_queue", "J1", 0));
  auto s = r.w->stats();
  CHECK(s.slots_total == 1);
  CHECK(s.instance_alive);
  CHECK_THROWS_AS(r.w->start("/images/runtime.sif"), Error);  // started twice
}

TEST_CASE("the mode comes from deploy.mode: runscript runs the image's runscript and opens no broker connection") {
  Rig r(config::Mode::runscript);
  r.w->start("/images/runtime.sif");
  REQUIRE(r.step_until([&] { return r.w->stats().broker_connected; }));  // runscript mode: the runscript is up
  CHECK(r.instance->runs == 1);
  CHECK(r.instance->execs == 0);
  CHECK(r.broker->subscriptions.empty());
  r.w->request_drain();
  REQUIRE(r.step_until([&] { return r.w->finished(); }));
  CHECK_FALSE(r.w->failed());
  CHECK_FALSE(r.instance->alive);
}

TEST_CASE("a drain takes no new task, lets the running call finish and acks it, then stops the instance") {
  Rig r(config::Mode::dispatch);
  auto tag = r.drain_with_one_call_running();
  REQUIRE(r.step_until([&] { return !r.broker->cancelled.empty(); }));  // stopped consuming
  CHECK(r.w->stats().state == State::draining);
  CHECK_FALSE(r.w->finished());
  CHECK(r.broker->acked.empty());
  r.release();
  REQUIRE(r.step_until([&] { return r.w->finished(); }));
  CHECK_FALSE(r.w->failed());
  CHECK(r.broker->acked == std::vector<std::uint64_t>{tag});
  CHECK(r.broker->requeued.empty());
  auto s = r.w->stats();
  CHECK(s.state == State::stopped);
  CHECK(s.tasks_done == 1);
  CHECK_FALSE(r.instance->alive);
  CHECK(r.instance->stops == 1);
  CHECK_FALSE(r.broker->open);
}

TEST_CASE("a drain past deploy.drain_timeout gives the running call back to the queue") {
  Rig r(config::Mode::dispatch, [](config::Config& c) { c.deploy.drain_timeout = 0.02; });
  auto tag = r.drain_with_one_call_running();
  REQUIRE(r.step_until([&] { return r.w->finished(); }));
  CHECK_FALSE(r.w->failed());
  CHECK(r.broker->acked.empty());
  CHECK(r.broker->requeued == std::vector<std::uint64_t>{tag});
  CHECK(r.w->stats().tasks_requeued == 1);
  r.release();
}

TEST_CASE("stop ends the handlers and the instance, once, however often it is called") {
  Rig r(config::Mode::dispatch);
  r.w->stop();  // before start: nothing to stop
  CHECK(r.instance->stops == 0);
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  r.w->stop();
  r.w->stop();
  CHECK(r.instance->stops == 1);
  CHECK_FALSE(r.instance->alive);
  CHECK_FALSE(r.broker->open);
  CHECK(r.w->stats().slots_busy == 0);
}

TEST_CASE("stop ends a runscript still going, once, however often it is called, and is safe before start") {
  Rig r(config::Mode::runscript);
  r.w->stop();  // before start: nothing to stop
  r.w->start("/images/runtime.sif");
  REQUIRE(r.step_until([&] { return r.w->stats().broker_connected; }));  // the runscript is up
  r.w->stop();
  CHECK_FALSE(r.w->stats().broker_connected);  // ended and reaped, not restarted
  r.w->stop();
  CHECK(r.instance->stops == 1);
  CHECK_FALSE(r.instance->alive);
}

TEST_CASE("a worker whose instance dies more often than deploy.restart_limit fails and gives its calls back") {
  Rig r(config::Mode::dispatch, {}, 2);  // restart_limit 1
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  r.hold();
  auto tag = r.broker->deliver(dispatch::encode(dispatch::Action::send_task, job(1)));
  REQUIRE(r.step_until([&] { return r.w->stats().slots_busy == 1; }));
  REQUIRE(r.step_until([&] { return !r.busy_role().empty(); }));
  std::string idle = r.busy_role() == "0" ? "1" : "0";
  // The instance dies; a handler's death makes the worker look at it. Each
  // time another idle handler dies, so no handler reaches its own limit first.
  r.instance->alive = false;
  REQUIRE(::kill(r.handler_pid("control"), SIGKILL) == 0);
  REQUIRE(r.step_until([&] { return r.instance->starts == 2; }));  // restarted after its backoff
  CHECK_FALSE(r.w->finished());
  CHECK(r.w->stats().restarts >= 1);
  r.instance->alive = false;
  REQUIRE(::kill(r.handler_pid(idle), SIGKILL) == 0);
  REQUIRE(r.step_until([&] { return r.w->finished(); }));
  CHECK(r.w->failed());
  auto s = r.w->stats();
  CHECK(s.state == State::failed);
  CHECK(s.last_error.find("died 2 times (deploy.restart_limit = 1)") != std::string::npos);
  CHECK(r.broker->requeued == std::vector<std::uint64_t>{tag});
  CHECK_FALSE(r.broker->open);
  r.release();
}

TEST_CASE("a worker that cannot record its messages in flight reports why and stops cleanly") {
  Rig r(config::Mode::dispatch);
  // Not a directory: the in-flight record cannot be made under it.
  r.dir.write("state", "");
  auto what = std::string();
  try {
    r.w->start("/images/runtime.sif");
  } catch (const Error& e) {
    what = e.what();
  }
  CHECK(what.find(r.dir.file("state")) != std::string::npos);  // the path that could not hold it
  CHECK(r.w->failed());
  CHECK(r.w->stats().last_error == what);
  r.w->step(milliseconds(1));  // a failed worker is not stepped
  r.w->stop();
  CHECK(r.w->stats().slots_busy == 0);
  r.w.reset();  // the destructor stops again
  CHECK(r.instance->stops == 1);
}

TEST_CASE("a runtime queue the broker deleted is declared, bound to the runtimes' fanout and consumed again") {
  Rig r(config::Mode::dispatch, [](config::Config& c) { c.singularity.runtime = "rt"; });
  r.w->start("/images/rt.sif");
  REQUIRE(r.consuming());
  REQUIRE(r.broker->subscriptions.size() == 1);
  const std::string q = "task_queue.runtime.rt";
  CHECK(r.broker->subscriptions[0].runtime_queue == q);
  CHECK(r.broker->subscriptions[0].runtimes_exchange == "task_queue.runtimes");
  REQUIRE(r.step_until([&] { return r.w->stats().consuming; }));
  r.broker->consumed.clear();
  // Both of the runtime queue's consumers, as a queue.delete cancels them.
  r.broker->to_cancel = {{1, "lhpc-runtime-reserve"}, {1, "lhpc-runtime-slots-1"}};
  REQUIRE(r.step_until([&] { return !r.w->stats().consuming; }));
  REQUIRE(r.step_until([&] { return r.w->stats().consuming; }));  // after the restore's backoff
  CHECK(r.broker->declared == std::vector<std::string>{"task_queue.runtimes", q});
  CHECK(r.broker->bound == std::vector<std::string>{q + " > task_queue.runtimes"});
  REQUIRE(r.step_until([&] { return r.broker->consumed.size() == 2; }));
  CHECK(r.broker->consumed[0] == q + " lhpc-runtime-reserve");
  CHECK(r.broker->consumed[1] == q + " lhpc-runtime-slots-2");  // the slot consumer: a slot is free
  CHECK(r.broker->subscriptions.size() == 1);                   // on the same connection
  auto tag = r.broker->deliver(dispatch::encode(dispatch::Action::send_task, job(1)));
  REQUIRE(r.step_until([&] { return r.broker->acked.size() == 1; }));
  CHECK(r.broker->acked[0] == tag);
}

namespace {

Env gpu_env(const std::string& visible) {
  Env env = Env::empty();
  env.set("CUDA_VISIBLE_DEVICES", visible);
  return env;
}

void gpu_runtime(config::Config& c, int per_slot) {
  c.singularity.gpus_per_slot = per_slot;
  c.singularity.worker_processes = 0;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

TEST_CASE("a GPU runtime on a 4-GPU node has 4 slots, each handler seeing only its own GPU, under --nv") {
  Rig r(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 1); }, 0, gpu_env("0,1,2,3"));
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  CHECK(r.w->slots() == 4);
  CHECK(r.w->stats().slots_total == 4);
  CHECK(r.instance->gpu == "--nv");
  REQUIRE(r.step_until([&] { return r.gpu_lines().size() == 5; }));
  auto lines = r.gpu_lines();
  for (const char* want :
       {"0 0 PCI_BUS_ID", "1 1 PCI_BUS_ID", "2 2 PCI_BUS_ID", "3 3 PCI_BUS_ID", "control none none"}) {
    CHECK_MESSAGE(contains(lines, want), want);
  }
  CHECK(r.w->stats().gpus == std::vector<std::vector<std::string>>{{"0"}, {"1"}, {"2"}, {"3"}});
}

TEST_CASE("two GPUs per slot on a 4-GPU node make 2 slots; AMD gets --rocm") {
  Rig r(
      config::Mode::dispatch,
      [](config::Config& c) {
        gpu_runtime(c, 2);
        c.singularity.gpu_vendor = config::GpuVendor::amd;
      },
      0,
      [] {
        Env env = Env::empty();
        env.set("ROCR_VISIBLE_DEVICES", "0,1,2,3");
        return env;
      }());
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  CHECK(r.w->slots() == 2);
  CHECK(r.instance->gpu == "--rocm");
  CHECK(r.w->stats().gpus == std::vector<std::vector<std::string>>{{"0", "1"}, {"2", "3"}});
}

TEST_CASE("an explicit smaller slot count lowers a GPU runtime's slots, never raises them") {
  Rig lower(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 1); }, 3, gpu_env("0,1,2,3"));
  lower.w->start("/images/runtime.sif");
  CHECK(lower.w->slots() == 3);
  Rig more(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 1); }, 8, gpu_env("4,5"));
  more.w->start("/images/runtime.sif");
  CHECK(more.w->slots() == 2);
  CHECK(more.w->stats().gpus == std::vector<std::vector<std::string>>{{"4"}, {"5"}});
}

TEST_CASE("singularity.nvccli adds --nvccli after --nv, for a GPU runtime and for singularity.nv alike") {
  Rig gpus(
      config::Mode::dispatch,
      [](config::Config& c) {
        gpu_runtime(c, 1);
        c.singularity.nvccli = true;
      },
      0, gpu_env("0,1"));
  gpus.w->start("/images/runtime.sif");
  CHECK(gpus.instance->gpu == "--nv --nvccli");
  Rig nv(config::Mode::dispatch, [](config::Config& c) {
    c.singularity.nv = true;
    c.singularity.nvccli = true;
  });
  nv.w->start("/images/runtime.sif");
  CHECK(nv.instance->gpu == "--nv --nvccli");
  // Without --nv it means nothing: a CPU runtime gets no GPU switch.
  Rig cpu(config::Mode::dispatch, [](config::Config& c) { c.singularity.nvccli = true; });
  cpu.w->start("/images/runtime.sif");
  CHECK(cpu.instance->gpu.empty());
}

TEST_CASE("a GPU runtime on a node without GPUs fails at start, saying so, before its instance starts") {
  Rig r(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 1); }, 0, Env::empty());
  try {
    r.w->start("/images/runtime.sif");
    FAIL("started without GPUs");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::engine);
    CHECK(std::string(e.what()).find("0 were found (/proc/driver/nvidia/gpus)") != std::string::npos);
  }
  CHECK(r.w->failed());
  CHECK(r.instance->starts == 0);
}

TEST_CASE("a GPU runtime in runscript mode is refused at start: the runscript's own processes get no slot") {
  Rig r(
      config::Mode::runscript, [](config::Config& c) { gpu_runtime(c, 1); }, 0,
      [] {
        Env e = Env::empty();
        e.set("CUDA_VISIBLE_DEVICES", "0,1");
        return e;
      }());
  try {
    r.w->start("/images/runtime.sif");
    FAIL("a GPU runtime started in runscript mode");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    CHECK(std::string(e.what()).find("needs deploy.mode = \"dispatch\"") != std::string::npos);
  }
  CHECK(r.instance->starts == 0);
}

TEST_CASE("a restarted GPU slot handler keeps its slot's devices") {
  Rig r(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 1); }, 0, gpu_env("0,1,2,3"));
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  REQUIRE(r.step_until([&] { return r.gpu_lines().size() == 5; }));
  pid_t before = r.handler_pid("2");
  REQUIRE(::kill(before, SIGKILL) == 0);
  REQUIRE(r.step_until([&] { return r.handler_pid("2") != before && r.gpu_lines().size() == 6; }));
  CHECK(r.gpu_lines().back() == "2 2 PCI_BUS_ID");
  CHECK_FALSE(r.w->finished());
}

namespace {

// Kills slot `role`'s handler `times` times, each time once its successor is up.
void kill_handler(Rig& r, const std::string& role, int times) {
  for (int i = 0; i < times; ++i) {
    pid_t pid = 0;
    REQUIRE(r.step_until([&] {
      pid = r.handler_pid(role);
      return pid != 0 && ::kill(pid, 0) == 0;
    }));
    REQUIRE(::kill(pid, SIGKILL) == 0);
    REQUIRE(r.step_until([&] { return r.handler_pid(role) != pid || r.w->stats().gpus_out.count(std::stoi(role)); }));
  }
}

}  // namespace

TEST_CASE("a GPU slot whose handler keeps dying is taken out of service; the rank serves with its other slots") {
  // deploy.restart_limit = 1 (the rig's): a second death within a minute is one too many.
  Rig r(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 1); }, 0, gpu_env("0,1,2,3"));
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  kill_handler(r, "2", 2);
  REQUIRE(r.step_until([&] { return r.w->stats().gpus_out.count(2) == 1; }));
  auto s = r.w->stats();
  CHECK_FALSE(r.w->finished());
  CHECK(s.state == State::running);
  CHECK(s.slots_total == 3);
  CHECK(s.gpus_out.size() == 1);
  CHECK(s.gpus_out.at(2).find("died 2 times within 60 s") != std::string::npos);
  CHECK(s.last_error.find("slot 2 out of service") != std::string::npos);
  // Not restarted again; the other three run a 3-call task.
  auto starts = r.gpu_lines().size();
  auto tag = r.broker->deliver(dispatch::encode(dispatch::Action::send_task, job(3)));
  REQUIRE(r.step_until([&] { return r.broker->acked.size() == 1; }));
  CHECK(r.broker->acked[0] == tag);
  CHECK(r.gpu_lines().size() == starts);
  CHECK(r.w->stats().gpus_out.size() == 1);
}

TEST_CASE("a GPU rank whose every slot is out of service stops consuming and says so") {
  Rig r(
      config::Mode::dispatch, [](config::Config& c) { gpu_runtime(c, 2); }, 0, gpu_env("0,1,2,3"));
  r.w->start("/images/runtime.sif");
  REQUIRE(r.consuming());
  kill_handler(r, "0", 2);
  REQUIRE(r.step_until([&] { return r.w->stats().gpus_out.count(0) == 1; }));
  CHECK_FALSE(r.w->finished());
  kill_handler(r, "1", 2);
  REQUIRE(r.step_until([&] { return r.w->finished(); }));
  auto s = r.w->stats();
  CHECK(s.state == State::failed);
  CHECK_FALSE(s.consuming);
  CHECK(s.gpus_out.size() == 2);
  CHECK(s.last_error.find("every slot is out of service") != std::string::npos);
}
