// The autoalloc controller's decisions as data: a demand/supply snapshot in,
// actions out (policy.h); the controller's loop against fake ports (ports.h)
// and a stepped clock; the sbatch argv and reply, Slurm time parsing and the
// state file's round trip. What needs real Slurm and a real broker is in
// tests/integration/test_autoalloc.py on the rig.
#include <doctest/doctest.h>

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "autoalloc/controller.h"
#include "autoalloc/local_scheduler.h"
#include "autoalloc/no_image.h"
#include "autoalloc/policy.h"
#include "autoalloc/ports.h"
#include "autoalloc/sbatch_reply.h"
#include "autoalloc/slurm_scheduler.h"
#include "dispatch/protocol.h"
#include "dispatch/runtime.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"

using namespace lhpc::autoalloc;

namespace {

Limits limits() {
  Limits l;
  l.max_nodes = 4;
  l.nodes_per_job = 1;
  l.max_pending = 1;
  l.min_nodes = 0;
  l.idle_timeout = 60;
  l.renew_before = 120;
  l.max_start_failures = 3;
  l.backoff_first = 10;
  l.backoff_cap = 300;
  return l;
}

Snapshot queue(std::uint64_t ready, std::vector<JobSnapshot> jobs = {}) {
  Snapshot s;
  s.now = 1000;
  s.ready = ready;
  s.consumers = 0;
  s.jobs = std::move(jobs);
  s.default_slots_per_node = 2;
  return s;
}

JobSnapshot job(const std::string& id, Phase p, int nodes = 1) {
  JobSnapshot j;
  j.id = id;
  j.phase = p;
  j.nodes = nodes;
  if (p == Phase::serving) {
    j.ready_ranks = nodes;
    j.slots_total = 2 * nodes;
  }
  return j;
}

int submits(const Decision& d) {
  return static_cast<int>(
      std::count_if(d.actions.begin(), d.actions.end(), [](const Action& a) { return a.kind == ActionKind::submit; }));
}

}  // namespace

TEST_CASE("tasks waiting with no deployment: one job is submitted") {
  auto d = decide(queue(5), limits());
  REQUIRE(d.actions.size() == 1);
  CHECK(d.actions[0].kind == ActionKind::submit);
  CHECK(d.actions[0].nodes == 1);
  CHECK(d.actions[0].job.empty());
  CHECK(d.next.find("submit") == 0);
}

TEST_CASE("an empty queue with nothing held: scaled to zero, nothing to do") {
  auto d = decide(queue(0), limits());
  CHECK(d.actions.empty());
  CHECK(d.next.find("scaled to zero") != std::string::npos);
}

TEST_CASE("capacity already coming counts as supply: no second job for the same tasks") {
  auto d = decide(queue(2, {job("1", Phase::pending)}), limits());
  CHECK(submits(d) == 0);
  d = decide(queue(2, {job("1", Phase::starting)}), limits());
  CHECK(submits(d) == 0);
}

TEST_CASE("a backlog beyond what is coming asks for more, one job per poll") {
  auto l = limits();
  l.max_pending = 3;
  auto d = decide(queue(100, {job("1", Phase::serving)}), l);
  CHECK(submits(d) == 1);
}

TEST_CASE("--max-nodes counts pending and running nodes together and is never exceeded") {
  auto l = limits();
  l.max_pending = 10;
  auto s = queue(1000, {job("1", Phase::serving, 2), job("2", Phase::pending, 1), job("3", Phase::starting, 1)});
  auto d = decide(s, l);
  CHECK(submits(d) == 0);
  CHECK(d.next.find("--max-nodes 4") != std::string::npos);
  // K that does not fit what is left is not submitted either.
  l.nodes_per_job = 2;
  s = queue(1000, {job("1", Phase::serving, 3)});
  CHECK(submits(decide(s, l)) == 0);
}

TEST_CASE("--max-pending bounds the jobs waiting in Slurm's queue") {
  auto l = limits();
  l.max_nodes = 100;
  l.max_pending = 2;
  auto d = decide(queue(1000, {job("1", Phase::pending), job("2", Phase::pending)}), l);
  CHECK(submits(d) == 0);
  CHECK(d.next.find("--max-pending 2") != std::string::npos);
  d = decide(queue(1000, {job("1", Phase::pending)}), l);
  CHECK(submits(d) == 1);
}

TEST_CASE("--min-nodes keeps nodes without work, and idle retirement stops at it") {
  auto l = limits();
  l.min_nodes = 1;
  CHECK(submits(decide(queue(0), l)) == 1);
  auto idle = job("1", Phase::serving);
  idle.idle_for = 1000;
  auto d = decide(queue(0, {idle}), l);
  CHECK(d.actions.empty());
}

TEST_CASE("an idle deployment is retired after --idle-timeout, not before, and not while busy") {
  auto j = job("7", Phase::serving);
  j.idle_for = 59;
  CHECK(decide(queue(0, {j}), limits()).actions.empty());
  j.idle_for = 61;
  auto d = decide(queue(0, {j}), limits());
  REQUIRE(d.actions.size() == 1);
  CHECK(d.actions[0].kind == ActionKind::retire);
  CHECK(d.actions[0].job == "7");
  j.slots_busy = 1;
  CHECK(decide(queue(0, {j}), limits()).actions.empty());
  // Already asked: not asked again.
  j.slots_busy = 0;
  j.stop_requested = true;
  CHECK(decide(queue(0, {j}), limits()).actions.empty());
}

TEST_CASE("nothing is retired while the broker cannot be asked") {
  auto j = job("7", Phase::serving);
  j.idle_for = 1e6;
  auto s = queue(0, {j});
  s.ready.reset();
  auto d = decide(s, limits());
  CHECK(d.actions.empty());
  CHECK(d.next.find("broker") != std::string::npos);
}

TEST_CASE("a pending job nobody needs any more is cancelled after the idle timeout") {
  auto s = queue(0, {job("9", Phase::pending)});
  s.demand_idle_for = 61;
  auto d = decide(s, limits());
  REQUIRE(d.actions.size() == 1);
  CHECK(d.actions[0].kind == ActionKind::cancel);
  s.demand_idle_for = 10;
  CHECK(decide(s, limits()).actions.empty());
}

TEST_CASE("renewal: a serving job near its limit with work left gets one successor") {
  auto j = job("5", Phase::serving);
  j.seconds_left = 100;
  j.slots_busy = 2;
  auto d = decide(queue(0, {j}), limits());
  REQUIRE(submits(d) == 1);
  CHECK(d.actions[0].job == "5");
  // Once renewed, not again.
  j.renewed = true;
  CHECK(submits(decide(queue(0, {j}), limits())) == 0);
  // Far from the limit, or with no work: no successor.
  j.renewed = false;
  j.seconds_left = 1000;
  CHECK(submits(decide(queue(0, {j}), limits())) == 0);
  j.seconds_left = 100;
  j.slots_busy = 0;
  CHECK(submits(decide(queue(0, {j}), limits())) == 0);
}

TEST_CASE("renewal obeys the limits too") {
  auto l = limits();
  l.max_nodes = 1;
  auto j = job("5", Phase::serving);
  j.seconds_left = 10;
  auto d = decide(queue(50, {j}), l);
  CHECK(submits(d) == 0);
  CHECK(d.next.find("renew job 5") != std::string::npos);
}

TEST_CASE("a refused submission backs off exponentially, capped; no submission during the backoff") {
  auto l = limits();
  CHECK(backoff_delay(1, l) == 10);
  CHECK(backoff_delay(2, l) == 20);
  CHECK(backoff_delay(3, l) == 40);
  CHECK(backoff_delay(10, l) == 300);
  CHECK(backoff_delay(1000, l) == 300);
  auto s = queue(5);
  s.backoff_until = s.now + 5;
  auto d = decide(s, l);
  CHECK(submits(d) == 0);
  CHECK(d.next.find("backing off") == 0);
  s.backoff_until = s.now - 1;
  CHECK(submits(decide(s, l)) == 1);
}

TEST_CASE("halted after start failures, or ending on SIGTERM: never submits") {
  auto s = queue(5);
  s.halted = true;
  CHECK(submits(decide(s, limits())) == 0);
  s.halted = false;
  s.submitting = false;
  CHECK(submits(decide(s, limits())) == 0);
}

TEST_CASE("a halt for start failures lifts when a later job serves") {
  auto l = limits();
  StartFailures f;
  CHECK_FALSE(on_start_failure(f, "a.out", 100, l));
  CHECK_FALSE(on_start_failure(f, "b.out", 110, l));
  CHECK(on_start_failure(f, "c.out", 120, l));  // the K-th in a row halts
  CHECK(f.halted);
  CHECK(f.outputs == std::vector<std::string>{"a.out", "b.out", "c.out"});
  CHECK(on_served(f));  // one still in flight serves
  CHECK_FALSE(f.halted);
  CHECK(f.in_row == 0);
  CHECK(f.outputs.empty());
  CHECK_FALSE(on_served(f));
}

TEST_CASE("a halt for start failures lifts after the cool-off for one probe job; its failure halts again") {
  auto l = limits();
  l.halt_cooloff = 600;
  StartFailures f;
  for (const char* out : {"a.out", "b.out", "c.out"}) {
    on_start_failure(f, out, 100, l);
  }
  REQUIRE(f.halted);
  CHECK_FALSE(cool_off(f, 100 + 599, l));
  CHECK(f.halted);
  CHECK(cool_off(f, 100 + 600, l));
  CHECK_FALSE(f.halted);
  auto s = queue(5);
  s.halted = f.halted;
  CHECK(submits(decide(s, l)) == 1);            // the probe
  CHECK(on_start_failure(f, "d.out", 800, l));  // it failed too: halted again at once
  CHECK(f.halted_at == 800);
  CHECK_FALSE(cool_off(f, 800 + 599, l));
}

TEST_CASE("slots per node learned from an earlier deployment count after scaling to zero, before the default") {
  // 6 ready, one node starting: the configured default (2 per node) wants more ...
  auto s = queue(6, {job("1", Phase::starting)});
  CHECK(submits(decide(s, limits())) == 1);
  // ... but a deployment reported 8 slots per node earlier: the starting node covers them.
  s.learned_slots_per_node = 8;
  CHECK(supply_of(s).slots_per_node == 8);
  CHECK(submits(decide(s, limits())) == 0);
  // A serving deployment's own report wins over both.
  auto j = job("2", Phase::serving, 1);
  j.slots_total = 4;
  s.jobs.push_back(j);
  CHECK(supply_of(s).slots_per_node == 4);
}

TEST_CASE("draining jobs hold nodes but offer no capacity") {
  auto d = decide(queue(3, {job("1", Phase::draining)}), limits());
  CHECK(submits(d) == 1);
  auto sp = supply_of(queue(3, {job("1", Phase::draining, 3)}));
  CHECK(sp.held_nodes == 3);
  CHECK(sp.free_slots == 0);
}

TEST_CASE("slots per node are learned from serving deployments") {
  auto j = job("1", Phase::serving, 2);
  j.slots_total = 16;
  auto sp = supply_of(queue(0, {j}));
  CHECK(sp.slots_per_node == 8);
  // 10 ready, 16 free: covered.
  CHECK(submits(decide(queue(10, {j}), limits())) == 0);
}

TEST_CASE("idle clock: busy slots or a moving done count reset it") {
  IdleClock c;
  CHECK(observe_idle(c, 100, 0, 0) == 0);
  CHECK(observe_idle(c, 130, 0, 0) == 30);
  CHECK(observe_idle(c, 140, 1, 0) == 0);
  CHECK(observe_idle(c, 150, 0, 0) == 10);
  CHECK(observe_idle(c, 160, 0, 4) == 0);
  CHECK(observe_idle(c, 190, 0, 4) == 30);
}

TEST_CASE("Slurm time formats") {
  CHECK(parse_slurm_time("5") == 300);
  CHECK(parse_slurm_time("1:30") == 90);
  CHECK(parse_slurm_time("1:00:00") == 3600);
  CHECK(parse_slurm_time("2-3") == 2 * 86400 + 3 * 3600);
  CHECK(parse_slurm_time("1-00:01") == 86400 + 60);
  CHECK(parse_slurm_time("1-00:00:05") == 86405);
  CHECK_FALSE(parse_slurm_time("UNLIMITED"));
  CHECK_FALSE(parse_slurm_time("INVALID"));
  CHECK_FALSE(parse_slurm_time(""));
  CHECK_FALSE(parse_slurm_time("1:2:3:4"));
  CHECK_FALSE(parse_slurm_time("a:b"));
}

TEST_CASE("sbatch runs with an explicit argv: limits, passthrough, template, image, cleanup; no URL") {
  SlurmOptions o{"/s/lithops-deploy.sh", "0:30:00", {"--partition=p", "--qos=q"}};
  Submission r{"/img/rt.sif", 2, "lithops-aa-1", "/st/out", "/cfg.toml"};
  std::vector<std::string> want = {"sbatch",        "--parsable",     "--job-name=lithops-aa-1",
                                   "--nodes=2",     "--time=0:30:00", "--output=/st/out/lithops-workers-%j.out",
                                   "--partition=p", "--qos=q",        "/s/lithops-deploy.sh",
                                   "/img/rt.sif",   "--cleanup"};
  CHECK(sbatch_argv(o, r) == want);
  r.runtime = "rt";  // a runtime of several: the deployment is told which
  want.insert(want.end(), {"--runtime", "rt"});
  CHECK(sbatch_argv(o, r) == want);
  CHECK(slurm_output("/st/out", "42") == "/st/out/lithops-workers-42.out");
  for (const auto& a : sbatch_argv(o, r)) {
    CHECK(a.find("amqp") == std::string::npos);
  }
}

TEST_CASE("a GPU runtime's sbatch line asks for its GPU slots per node and tells deploy it is one") {
  SlurmOptions o{"/s/lithops-deploy.sh", "0:30:00", {"--partition=gpu"}};
  Submission r{"/img/rt.sif", 2, "lithops-aa-1", "/st/out", ""};
  r.gpus_per_slot = 2;
  r.gpu_slots = 4;
  r.gpu_vendor = lhpc::config::GpuVendor::amd;
  std::vector<std::string> want = {"sbatch",
                                   "--parsable",
                                   "--job-name=lithops-aa-1",
                                   "--nodes=2",
                                   "--time=0:30:00",
                                   "--output=/st/out/lithops-workers-%j.out",
                                   "--gpus-per-node=8",
                                   "--partition=gpu",
                                   "/s/lithops-deploy.sh",
                                   "/img/rt.sif",
                                   "--gpus-per-slot",
                                   "2",
                                   "--gpu-vendor",
                                   "amd",
                                   "--cleanup"};
  CHECK(sbatch_argv(o, r) == want);
  // A site that wants gres (autoalloc.gpu_request = "gres"): the same count, as --gres=gpu:N.
  o.gpu_request = lhpc::config::GpuRequest::gres;
  want[6] = "--gres=gpu:8";
  CHECK(sbatch_argv(o, r) == want);
}

TEST_CASE("the state file round-trips the jobs a restarted controller adopts") {
  State s;
  JobRecord r;
  r.id = "42";
  r.nodes = 2;
  r.phase = Phase::serving;
  r.ever_serving = true;
  r.renewed = true;
  r.out = "/x/out-42.out";
  s.jobs.push_back(r);
  s.refused_in_row = 2;
  s.backoff_until = 123.5;
  s.last_refusal = "sbatch: error: invalid partition";
  s.ready = 7;
  auto back = state_from_json(to_json(s), "test");
  REQUIRE(back.jobs.size() == 1);
  CHECK(back.jobs[0].id == "42");
  CHECK(back.jobs[0].nodes == 2);
  CHECK(back.jobs[0].phase == Phase::serving);
  CHECK(back.jobs[0].ever_serving);
  CHECK(back.jobs[0].renewed);
  CHECK(back.refused_in_row == 2);
  CHECK(back.backoff_until == 123.5);
  CHECK(back.last_refusal == s.last_refusal);
  CHECK(back.ready == 7);
  CHECK_THROWS_AS(state_from_json("{}", "bad.json"), lhpc::Error);
}

// ---------------------------------------------------------------- sbatch's reply

TEST_CASE("sbatch's reply: the job id of --parsable, with or without a cluster") {
  auto r = parse_sbatch_reply(0, "4242\n", "");
  CHECK(r.job == "4242");
  CHECK(r.cluster.empty());
  r = parse_sbatch_reply(0, "4242;west\n", "");
  CHECK(r.job == "4242");
  CHECK(r.cluster == "west");
  CHECK(parse_sbatch_reply(0, "  17 \r\n\n", "").job == "17");
  CHECK(parse_sbatch_reply(0, "4294967295", "").job == "4294967295");
}

TEST_CASE("sbatch's reply: a site wrapper's banner before or after the id is not the id") {
  auto r = parse_sbatch_reply(0, "Welcome to the cluster!\nYour project has 12 hours left.\n4242\n", "");
  CHECK(r.job == "4242");
  r = parse_sbatch_reply(0, "4242\n-- job accounted to project abc --\n", "");
  CHECK(r.job == "4242");
  CHECK(r.refusal.empty());
}

TEST_CASE("sbatch's reply: anything else is a refusal that shows sbatch's words, bounded and clean") {
  auto r = parse_sbatch_reply(0, "Submitted batch job 4242\n", "");
  CHECK_FALSE(r.job);
  CHECK(r.unreadable_success);
  CHECK(r.refusal == "sbatch printed no job id: Submitted batch job 4242");
  for (const char* bad : {"0", "042", "4294967296", "12345678901", "42;", "42;a b", "42;x;y", "-1", "4 2", "42abc"}) {
    CAPTURE(bad);
    CHECK_FALSE(parse_sbatch_reply(0, bad, "").job);
  }
  CHECK_FALSE(parse_sbatch_reply(0, "42;" + std::string(65, 'c'), "").job);
  r = parse_sbatch_reply(1, "", "sbatch: error: invalid partition specified: nonexistent\n");
  CHECK_FALSE(r.job);
  CHECK_FALSE(r.unreadable_success);
  CHECK(r.refusal == "sbatch: error: invalid partition specified: nonexistent");
  CHECK(parse_sbatch_reply(1, "4242\n", "").refusal == "sbatch exited with code 1: 4242");
  CHECK(parse_sbatch_reply(0, "", "").refusal == "sbatch exited with code 0 and printed nothing");
  // A wrapper that echoes the environment: no password, no terminal escape, one bounded line.
  r = parse_sbatch_reply(0, "\x1b]0;pwned\x07 AMQP_URL=amqp://u:hunter2@h/v\n" + std::string(5000, 'x'), "");
  CHECK(r.refusal.find("hunter2") == std::string::npos);
  CHECK(r.refusal.find('\x1b') == std::string::npos);
  CHECK(r.refusal.find('\n') == std::string::npos);
  CHECK(r.refusal.size() <= k_reply_shown);
}

// ---------------------------------------------------------------- the controller's loop

namespace {

// The world the fake ports show: jobs in a scheduler, a queue, what each
// deployment reports. It outlives a controller, so a restart sees it again.
struct World {
  struct Job {
    SeenJob seen;
    std::string name;
  };
  std::map<std::string, Job> jobs;
  int next_id = 100;
  std::vector<Submission> submissions;  // every call, refused ones too
  std::optional<std::string> refuse;    // the refusal of the next submissions
  bool made_anyway = false;             // a refusal that still made the job (an unreadable reply)
  bool scheduler_down = false;
  std::vector<std::string> cancelled, stops;
  std::optional<QueueLook> queue = QueueLook{};
  std::map<std::string, QueueLook> runtime_queues;  // <queue>.runtime.<runtime>
  std::set<std::string> images;                     // the image files that exist
  std::map<std::string, DeploymentLook> reports;
  double t = 1000;

  std::vector<std::string> held() const {
    std::vector<std::string> ids;
    for (const auto& [id, j] : jobs) {
      if (!j.seen.ended) {
        ids.push_back(id);
      }
    }
    return ids;
  }
  int held_nodes() const {
    int n = 0;
    for (const auto& id : held()) {
      n += jobs.at(id).seen.nodes;
    }
    return n;
  }
  int pending() const {
    int n = 0;
    for (const auto& id : held()) {
      n += jobs.at(id).seen.pending ? 1 : 0;
    }
    return n;
  }
  // Slurm starts the job; its deployment reports `ready` ranks of 2 slots.
  void serve(const std::string& id, int busy = 0, unsigned long long done = 0) {
    jobs.at(id).seen.pending = false;
    auto& d = reports[id];
    d.seen = DeploymentLook::Seen::report;
    d.ready_ranks = jobs.at(id).seen.nodes;
    d.slots_total = 2 * d.ready_ranks;
    d.slots_busy = busy;
    d.done = done;
  }
  void end(const std::string& id) {
    jobs.at(id).seen.ended = true;
    reports.erase(id);
  }
  void ready(std::uint64_t n) { queue = QueueLook{n, 0}; }

  // Messages the controller may take (QueueProbe::take), what it did with
  // them, and what it wrote to the client's storage.
  std::deque<std::string> task_msgs, copy_msgs;
  std::map<std::string, std::deque<std::string>> runtime_msgs;
  std::vector<std::pair<std::string, std::string>> moved;  // runtime, body
  std::vector<std::string> acked;
  bool move_fails = false;
  struct Put {
    nlohmann::json storage;
    std::string key, value;
  };  // one per entry
  std::vector<Put> puts;
  std::optional<std::string> store_refuses;
  std::vector<std::string> sif_dir;  // the runtimes whose image is in sif_path
};

struct FakeScheduler final : Scheduler {
  World& w;
  unsigned long long calls = 0;  // this instance's, as a real one counts
  explicit FakeScheduler(World& world) : w(world) {}
  std::optional<std::map<std::string, SeenJob>> query(const std::vector<std::string>& ids) override {
    if (w.scheduler_down) {
      return std::nullopt;
    }
    std::map<std::string, SeenJob> out;
    for (const auto& id : ids) {
      auto it = w.jobs.find(id);
      out[id] = it == w.jobs.end() ? SeenJob{.ended = true} : it->second.seen;
    }
    return out;
  }
  std::vector<std::string> jobs_named(const std::string& name) override {
    std::vector<std::string> ids;
    for (const auto& id : w.held()) {
      if (w.jobs.at(id).name == name) {
        ids.push_back(id);
      }
    }
    return ids;
  }
  Submitted submit(const Submission& s) override {
    ++calls;
    w.submissions.push_back(s);
    std::string id = std::to_string(w.next_id++);
    if (!w.refuse || w.made_anyway) {
      w.jobs[id] = {SeenJob{.pending = true, .nodes = s.nodes}, s.job_name};
    }
    if (w.refuse) {
      return {std::nullopt, "", *w.refuse, w.made_anyway};
    }
    return {id, s.output_dir + "/w-" + id + ".out", ""};
  }
  void cancel(const std::string& id) override {
    w.cancelled.push_back(id);
    w.end(id);
  }
  SchedulerCounters counters() const override { return {calls, 0}; }
};

struct FakeQueue final : QueueProbe {
  World& w;
  unsigned long long n = 0;
  explicit FakeQueue(World& world) : w(world) {}
  std::optional<QueueLook> look() override {
    ++n;
    auto q = w.queue;
    if (q) {
      q->ready += w.task_msgs.size();
    }
    return q;
  }
  struct Out {
    Source source;
    std::deque<std::string>* queue;
    std::string body;
  };
  std::map<std::uint64_t, Out> out;  // taken, not settled
  std::uint64_t tags = 0;
  std::deque<std::string>& from(Source s, const std::string& runtime) {
    return s == Source::task_queue ? w.task_msgs : s == Source::copies ? w.copy_msgs : w.runtime_msgs[runtime];
  }
  std::optional<Taken> take(Source s, const std::string& runtime) override {
    auto& q = from(s, runtime);
    if (q.empty()) {
      return std::nullopt;
    }
    out[++tags] = {s, &q, q.front()};
    q.pop_front();
    if (out[tags].body.starts_with("wanted:")) {  // a deployment's notice: the header, no body
      return Taken{tags, "", out[tags].body.substr(7)};
    }
    return Taken{tags, out[tags].body};
  }
  void settle(Source s, std::uint64_t tag, bool done) override {
    auto m = out.at(tag);
    CHECK(m.source == s);
    out.erase(tag);
    if (done) {
      w.acked.push_back(m.body);
    } else {
      m.queue->push_front(m.body);
    }
  }
  bool move(const std::string& runtime, const std::string& body) override {
    if (w.move_fails) {
      return false;
    }
    w.moved.emplace_back(runtime, body);
    return true;
  }
  std::optional<QueueLook> look_runtime(const std::string& runtime) override {
    ++n;
    if (!w.queue) {
      return std::nullopt;  // the broker is down for every queue
    }
    auto it = w.runtime_queues.find(runtime);
    return it == w.runtime_queues.end() ? QueueLook{} : it->second;
  }
  unsigned long long queries() const override { return n; }
};

struct FakeDeployments final : DeploymentProbe {
  World& w;
  explicit FakeDeployments(World& world) : w(world) {}
  DeploymentLook look(const std::string& job) override {
    auto it = w.reports.find(job);
    return it == w.reports.end() ? DeploymentLook{} : it->second;
  }
  void request_stop(const std::string& job) override {
    w.stops.push_back(job);
    if (auto it = w.reports.find(job); it != w.reports.end()) {
      it->second.winding_down = true;
    }
  }
};

struct FakeStore final : ClientStore {
  World& w;
  explicit FakeStore(World& world) : w(world) {}
  std::optional<std::string> put(const nlohmann::json& storage,
                                 const std::vector<std::pair<std::string, std::string>>& entries) override {
    if (w.store_refuses) {
      return w.store_refuses;
    }
    for (const auto& [key, value] : entries) {
      w.puts.push_back({storage, key, value});
    }
    return std::nullopt;
  }
};

// One controller on the fake world, in a state directory of its own.
struct Loop {
  lhpc::test::TempDir dir{"autoalloc"};
  lhpc::test::EnvGuard state{"LITHOPS_HPC_STATE_DIR", dir.path};
  World w;
  Settings s;
  std::unique_ptr<Controller> ctl;

  explicit Loop(Limits l = limits(), std::vector<RuntimeImage> runtimes = {}) {
    s.limits = l;
    s.sif = "/img/rt.sif";
    s.sif_path = "/img";
    s.runtimes = std::move(runtimes);
    s.default_slots = 2;
    start();
  }
  void start() {
    ctl.reset();  // the lock goes with the old one
    Ports p{std::make_unique<FakeScheduler>(w),
            std::make_unique<FakeQueue>(w),
            std::make_unique<FakeDeployments>(w),
            [this] { return w.t; },
            [this](const std::string& sif) { return w.images.contains(sif); },
            std::make_unique<FakeStore>(w),
            [this](const std::string&) { return w.sif_dir; }};
    ctl = std::make_unique<Controller>(s, std::move(p));
    ctl->adopt();
  }
  // One poll, `dt` seconds after the last.
  const State& poll(double dt = 1) {
    w.t += dt;
    ctl->poll();
    return ctl->state();
  }
  // `n` polls, `dt` seconds apart.
  const State& polls(int n, double dt = 1) {
    for (int i = 0; i < n; ++i) {
      poll(dt);
    }
    return ctl->state();
  }
  int submitted() const { return static_cast<int>(w.submissions.size()); }
  std::string last_job() const { return std::to_string(w.next_id - 1); }
};

}  // namespace

TEST_CASE("controller: tasks with no deployment bring one job; idle, it is retired and nothing is held") {
  Loop l;
  l.poll();
  CHECK(l.submitted() == 0);  // an empty queue with nothing held: nothing to do
  l.w.ready(6);
  l.poll();
  REQUIRE(l.submitted() == 1);
  CHECK(l.w.submissions[0].nodes == 1);
  CHECK(l.w.submissions[0].sif == "/img/rt.sif");
  CHECK(l.w.submissions[0].job_name == job_name());
  CHECK(l.w.submissions[0].gpus_per_slot == 0);  // a CPU runtime asks for no GPU
  auto id = l.last_job();
  l.poll();
  CHECK(l.submitted() == 1);  // --max-pending 1
  l.w.serve(id, 2);
  l.w.ready(0);
  CHECK(l.poll().jobs.at(0).phase == Phase::serving);
  l.w.serve(id, 0, 6);  // the tasks are done
  l.poll();
  l.poll(59);
  CHECK(l.w.stops.empty());  // not idle long enough (--idle-timeout 60)
  l.poll(2);
  CHECK(l.w.stops == std::vector<std::string>{id});
  CHECK(l.poll().jobs.at(0).phase == Phase::draining);
  l.w.end(id);
  auto& st = l.poll();
  CHECK(st.jobs.empty());
  CHECK(st.start_failures.in_row == 0);
  l.polls(5, 100);
  CHECK(l.submitted() == 1);
  CHECK(l.w.held().empty());
  CHECK(l.ctl->state().next.find("scaled to zero") != std::string::npos);
}

TEST_CASE("controller: under a backlog --max-pending and --max-nodes hold at every poll, and the limit is reached") {
  auto lim = limits();
  lim.max_nodes = 8;
  lim.nodes_per_job = 2;
  lim.max_pending = 2;
  Loop l(lim);
  l.w.ready(1000);
  int peak = 0;
  for (int i = 0; i < 20; ++i) {
    int before = l.submitted();
    l.poll();
    CHECK(l.submitted() - before <= 1);  // at most one submission per poll
    CHECK(l.w.held_nodes() <= 8);
    CHECK(l.w.pending() <= 2);
    peak = std::max(peak, l.w.held_nodes());
    if (i == 3) {
      CHECK(l.submitted() == 2);  // two pending: Slurm's queue is full for us
      CHECK(l.ctl->state().next.find("--max-pending 2") != std::string::npos);
    }
    if (i >= 5) {
      for (const auto& id : l.w.held()) {
        l.w.serve(id, 4);  // Slurm starts them, every slot busy
      }
    }
  }
  CHECK(peak == 8);
  CHECK(l.submitted() == 4);
  CHECK(l.ctl->state().next.find("--max-nodes 8") != std::string::npos);
}

TEST_CASE("controller: a serving job near its time limit with work left gets one successor before it ends") {
  Loop l;
  l.w.ready(3);
  l.poll();
  auto first = l.last_job();
  l.w.serve(first, 2);
  l.w.jobs.at(first).seen.seconds_left = 1000;
  l.w.ready(0);
  l.poll();
  CHECK(l.submitted() == 1);
  l.w.jobs.at(first).seen.seconds_left = 100;  // below --renew-before 120
  l.poll();
  REQUIRE(l.submitted() == 2);
  const auto& st = l.ctl->state();
  REQUIRE(st.jobs.size() == 2);
  CHECK(st.jobs[0].renewed);
  CHECK(st.jobs[1].renews == first);
  l.poll();
  l.poll();
  CHECK(l.submitted() == 2);  // renewed once only
}

TEST_CASE("controller: a refused submission shows the scheduler's words and is retried only after the backoff") {
  Loop l;
  l.w.refuse = "sbatch: error: invalid partition specified: nonexistent";
  l.w.ready(5);
  auto& st = l.poll();
  CHECK(l.submitted() == 1);
  CHECK(st.refused_in_row == 1);
  CHECK(st.last_refusal == *l.w.refuse);
  CHECK(st.error.find("invalid partition specified") != std::string::npos);
  CHECK(st.error.find("next try in 10 s") != std::string::npos);
  l.polls(9);  // 9 s: still within the first 10 s
  CHECK(l.submitted() == 1);
  l.poll(2);
  CHECK(l.submitted() == 2);
  CHECK(l.ctl->state().error.find("next try in 20 s") != std::string::npos);
  l.poll(19);
  CHECK(l.submitted() == 2);
  l.w.refuse.reset();  // the partition is back
  l.poll(2);
  CHECK(l.submitted() == 3);
  CHECK(l.ctl->state().refused_in_row == 0);
  CHECK(l.ctl->state().error.empty());
  CHECK(l.ctl->state().jobs.size() == 1);
}

TEST_CASE("controller: a job made despite an unreadable reply is found by name, not submitted again") {
  Loop l;
  l.w.refuse = "sbatch printed no job id: Welcome!";
  l.w.made_anyway = true;
  l.w.ready(1);
  l.poll();
  REQUIRE(l.submitted() == 1);
  CHECK(l.ctl->state().jobs.size() == 1);  // adopted by name at once
  l.w.refuse.reset();
  l.polls(30);
  CHECK(l.submitted() == 1);
  CHECK(l.w.held().size() == 1);
}

TEST_CASE("controller: a GPU runtime's submissions ask for its GPU slots, and supply is counted in them") {
  auto lim = limits();
  lim.max_pending = 2;
  Loop l(lim);
  l.s.gpus_per_slot = 1;
  l.s.default_slots = 4;
  l.start();
  l.w.ready(4);
  l.poll();
  REQUIRE(l.submitted() == 1);
  CHECK(l.w.submissions[0].gpus_per_slot == 1);
  CHECK(l.w.submissions[0].gpu_slots == 4);
  CHECK(sbatch_argv(SlurmOptions{"/t.sh"}, l.w.submissions[0])[6] == "--gpus-per-node=4");
  l.poll();
  CHECK(l.submitted() == 1);  // 4 tasks: the pending node's 4 GPU slots cover them
  l.w.ready(8);
  l.poll();
  CHECK(l.submitted() == 2);  // 8: they do not
}

TEST_CASE("controller: jobs ending before serving halt submissions; a job that serves lifts the halt") {
  auto lim = limits();
  lim.max_start_failures = 2;
  lim.max_pending = 2;
  lim.nodes_per_job = 1;
  Loop l(lim);
  l.w.ready(100);
  l.poll();
  l.poll();
  REQUIRE(l.submitted() == 2);
  auto a = std::to_string(l.w.next_id - 2), b = l.last_job();
  l.w.end(a);  // ended without a report: its image did not start
  l.poll();
  CHECK_FALSE(l.ctl->state().start_failures.halted);
  CHECK(l.ctl->state().start_failures.in_row == 1);
  l.w.end(b);
  auto st = l.poll();
  REQUIRE(st.start_failures.halted);
  CHECK(st.error.find("2 jobs in a row ended before serving") != std::string::npos);
  CHECK(st.error.find("/w-" + a + ".out") != std::string::npos);
  CHECK(st.error.find("/w-" + b + ".out") != std::string::npos);
  int n = l.submitted();
  l.polls(20);
  CHECK(l.submitted() == n);  // halted: nothing more
  CHECK(l.ctl->state().next.find("halted") == 0);
  // One still in flight serves: the halt lifts and submissions resume.
  auto live = l.w.held();
  REQUIRE_FALSE(live.empty());
  l.w.serve(live[0], 2);
  l.poll();
  CHECK_FALSE(l.ctl->state().start_failures.halted);
  CHECK(l.ctl->state().error.empty());
  l.poll();
  CHECK(l.submitted() > n);
}

TEST_CASE("controller: a halt lifts after its cool-off for one probe job, and a failing probe halts again at once") {
  auto lim = limits();
  lim.max_start_failures = 2;
  lim.halt_cooloff = 600;
  Loop l(lim);
  l.w.ready(100);
  while (!l.ctl->state().start_failures.halted) {
    REQUIRE(l.submitted() < 10);
    l.poll();
    for (const auto& id : l.w.held()) {
      l.w.end(id);
    }
  }
  l.poll();  // the last one's end is seen
  int n = l.submitted();
  l.poll(598);
  CHECK(l.submitted() == n);
  l.poll(10);                     // past the cool-off
  CHECK(l.submitted() == n + 1);  // the probe
  l.w.end(l.last_job());
  l.poll();
  CHECK(l.ctl->state().start_failures.halted);
  l.poll(100);
  CHECK(l.submitted() == n + 1);
}

TEST_CASE("controller: restarted, it adopts its jobs from its state and by name, and submits no duplicate") {
  auto lim = limits();
  lim.max_nodes = 2;
  lim.max_pending = 2;
  Loop l(lim);
  l.w.ready(1);
  l.poll();
  auto saved = l.last_job();
  l.w.serve(saved, 2);
  l.w.ready(0);
  l.poll();
  // A second job was submitted and the controller killed before it saved its state.
  l.w.jobs["777"] = {SeenJob{.pending = true, .nodes = 1}, job_name()};
  l.w.jobs["778"] = {SeenJob{.pending = true, .nodes = 1}, "somebody-else"};
  int n = l.submitted();
  l.start();
  auto& st = l.ctl->state();
  REQUIRE(st.jobs.size() == 2);
  CHECK(st.jobs[0].id == saved);
  CHECK(st.jobs[1].id == "777");
  l.w.ready(1000);
  l.polls(10);
  CHECK(l.submitted() == n);  // the backlog wants nodes, but both are held
  CHECK(l.ctl->state().jobs.size() == 2);
  CHECK(l.ctl->state().sbatch_calls == static_cast<unsigned long long>(n));  // counters carry across the restart
}

TEST_CASE("controller: a second controller on the same state directory is refused") {
  Loop l;
  Ports p{std::make_unique<FakeScheduler>(l.w), std::make_unique<FakeQueue>(l.w),
          std::make_unique<FakeDeployments>(l.w), nullptr};
  CHECK_THROWS_AS(Controller(l.s, std::move(p)), lhpc::Error);
}

TEST_CASE("controller: a scheduler that does not answer ends nothing; the broker not answering retires nothing") {
  Loop l;
  l.w.ready(1);
  l.poll();
  auto id = l.last_job();
  l.w.serve(id, 0, 1);
  l.w.ready(0);
  l.poll();
  l.w.scheduler_down = true;
  l.w.queue.reset();
  l.polls(5, 100);
  CHECK(l.ctl->state().jobs.size() == 1);
  CHECK(l.ctl->state().start_failures.in_row == 0);
  CHECK(l.w.stops.empty());
  CHECK(l.submitted() == 1);
}

TEST_CASE("controller: ending with --drain-on-exit asks serving deployments to stop and cancels the others") {
  auto lim = limits();
  lim.max_pending = 2;
  Loop l(lim);
  l.w.ready(100);
  l.poll();
  auto serving = l.last_job();
  l.w.serve(serving, 2);
  l.poll();
  auto pending = l.last_job();
  REQUIRE(pending != serving);
  l.ctl->finish(true);
  CHECK(l.w.stops == std::vector<std::string>{serving});
  CHECK(l.w.cancelled == std::vector<std::string>{pending});
  CHECK(l.ctl->state().controller == "stopped");
}

TEST_CASE("a state file's number outside its field's range is refused, never converted") {
  State s;
  JobRecord r;
  r.id = "42";
  r.nodes = 2;
  s.jobs.push_back(r);
  s.ready = 3;
  const auto good = nlohmann::json::parse(to_json(s));
  auto refusal = [&](const std::function<void(nlohmann::json&)>& change) {
    auto j = good;
    change(j);
    try {
      state_from_json(j.dump(), "state.json");
    } catch (const lhpc::Error& e) {
      return std::string(e.what());
    }
    return std::string("read: ") + j.dump();
  };
  using J = nlohmann::json;
  CHECK(refusal([](J& j) { j["jobs"][0]["nodes"] = 1e20; }) ==
        "state.json: 'jobs[0].nodes' is not an integer from -2147483648 to 2147483647");
  CHECK(refusal([](J& j) { j["jobs"][0]["nodes"] = 100001; }) ==
        "state.json: 'jobs[0].nodes' is not an integer from 0 to 100000");
  CHECK(refusal([](J& j) { j["jobs"][0]["nodes"] = -1; }).find("'jobs[0].nodes'") != std::string::npos);
  CHECK(refusal([](J& j) { j["jobs"][0]["done"] = 1e20; }) ==
        "state.json: 'jobs[0].done' is not an integer from 0 to 18446744073709551615");
  CHECK(refusal([](J& j) { j["demand"]["ready"] = 1e20; }).find("'demand.ready'") != std::string::npos);
  CHECK(refusal([](J& j) { j["demand"]["ready"] = -1; }).find("'demand.ready'") != std::string::npos);
  CHECK(refusal([](J& j) { j["pid"] = 1e20; }).find("'pid'") != std::string::npos);
  CHECK(refusal([](J& j) { j["refused_in_row"] = 2.5; }).find("'refused_in_row'") != std::string::npos);
  CHECK(refusal([](J& j) { j["demand"]["consumers"] = 4294967296.0; }).find("'demand.consumers'") != std::string::npos);
  auto ok = good;
  ok["jobs"][0]["done"] = 18446744073709551615ULL;
  ok["demand"]["ready"] = nullptr;
  auto back = state_from_json(ok.dump(), "state.json");
  CHECK(back.jobs[0].idle.done == 18446744073709551615ULL);
  CHECK_FALSE(back.ready);
}

TEST_CASE("controller: two runtimes with a backlog share --max-nodes; each submission names its runtime's image") {
  auto lim = limits();
  lim.max_pending = 4;
  Loop l(lim, {{"rt-a", "/img/rt-a.sif"}, {"rt-b", "/img/rt-b.sif"}});
  l.w.images = {"/img/rt-a.sif", "/img/rt-b.sif"};
  l.w.ready(100);                        // the task queue: the first runtime's demand
  l.w.runtime_queues["rt-b"] = {50, 0};  // what rt-a's deployments moved
  for (int i = 0; i < 8; ++i) {
    l.poll();
    CHECK(l.w.held_nodes() <= 4);
  }
  std::map<std::string, int> per;
  for (const auto& sub : l.w.submissions) {
    ++per[sub.runtime];
    CHECK(sub.sif == "/img/" + sub.runtime + ".sif");
  }
  CHECK(per == std::map<std::string, int>{{"rt-a", 2}, {"rt-b", 2}});
  CHECK(l.ctl->state().next.find("runtime rt-a: ") != std::string::npos);
  CHECK(l.ctl->state().next.find("runtime rt-b: ") != std::string::npos);
  // Restarted, each job still counts for its own runtime: nothing more is asked for.
  l.start();
  l.poll();
  CHECK(l.submitted() == 4);
  int b = 0;
  for (const auto& j : l.ctl->state().jobs) {
    b += j.runtime == "rt-b" ? 1 : 0;
  }
  CHECK(b == 2);
}

TEST_CASE("controller: each runtime's submissions ask for its own GPUs (from its image's labels)") {
  auto lim = limits();
  lim.max_pending = 4;
  RuntimeImage gpu{"rt-gpu", "/img/rt-gpu.sif"};
  gpu.gpus_per_slot = 2;
  gpu.gpu_vendor = lhpc::config::GpuVendor::amd;
  Loop l(lim, {{"rt-cpu", "/img/rt-cpu.sif"}, gpu});
  l.w.images = {"/img/rt-cpu.sif", "/img/rt-gpu.sif"};
  l.w.ready(100);
  l.w.runtime_queues["rt-gpu"] = {50, 0};
  l.poll();
  l.poll();
  std::map<std::string, int> gpus;
  for (const auto& sub : l.w.submissions) {
    gpus[sub.runtime] = sub.gpus_per_slot;
    if (sub.runtime == "rt-gpu") {
      CHECK(sub.gpu_vendor == lhpc::config::GpuVendor::amd);
    }
  }
  CHECK(gpus == std::map<std::string, int>{{"rt-cpu", 0}, {"rt-gpu", 2}});
}

TEST_CASE("controller: a runtime whose image is missing is not submitted and is reported until it appears") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}, {"rt-b", "/img/rt-b.sif"}});
  l.w.images = {"/img/rt-a.sif"};
  l.w.runtime_queues["rt-b"] = {7, 0};
  l.poll();
  l.poll();
  CHECK(l.submitted() == 0);
  const auto& st = l.ctl->state();
  CHECK(st.next.find("runtime rt-b: not submitting: no image at /img/rt-b.sif") != std::string::npos);
  CHECK(status_line(st, l.w.t).find("runtime rt-b: no image at /img/rt-b.sif (7 task(s) ready)") != std::string::npos);
  l.w.images.insert("/img/rt-b.sif");
  l.poll();
  REQUIRE(l.submitted() == 1);
  CHECK(l.w.submissions[0].runtime == "rt-b");
  CHECK(l.w.submissions[0].sif == "/img/rt-b.sif");
}

// ------------------------------------------- clients of a runtime with no image

namespace {

constexpr const char* k_version = "3.7.1.dev0";

// The get_metadata the Lithops singularity backend publishes for `runtime`:
// its storage configuration, the hashed runtime_name, the log level.
std::string metadata_request(const std::string& runtime) {
  nlohmann::json p = {{"monitoring_interval", 2},
                      {"backend", "redis"},
                      {"redis",
                       {{"host", "127.0.0.1"},
                        {"port", 6380},
                        {"password", "s3cret"},
                        {"storage_bucket", "storage"},
                        {"user_agent", "lithops/3.7.1.dev0"}}},
                      {"runtime_name", lhpc::dispatch::lithops_job_name(runtime, 128, k_version)},
                      {"log_level", 20}};
  return lhpc::dispatch::encode(lhpc::dispatch::Action::get_metadata, p);
}

// A send_task of `calls` calls as the client publishes it (the parts the controller reads).
std::string task_for(const std::string& runtime, int calls = 1) {
  nlohmann::json ids = nlohmann::json::array(), ranges = nlohmann::json::array();
  for (int i = 0; i < calls; ++i) {
    ids.push_back(fmt::format("{:05d}", i));
    ranges.push_back({i * 10, i * 10 + 9});
  }
  nlohmann::json config = {{"lithops", {{"backend", "singularity"}, {"storage", "redis"}}},
                           {"redis", {{"host", "127.0.0.1"}, {"port", 6380}}}};
  nlohmann::json p = {{"job_key", "A000-M001"},  {"executor_id", "A000"},      {"job_id", "M001"},
                      {"call_ids", ids},         {"data_byte_ranges", ranges}, {"total_calls", calls},
                      {"runtime_name", runtime}, {"config", config},           {"host_submit_tstamp", 1000.0}};
  return lhpc::dispatch::encode(lhpc::dispatch::Action::send_task, p);
}

std::string meta_key(const std::string& runtime) {
  return "lithops.jobs/" + lhpc::dispatch::lithops_job_name(runtime, 128, k_version) + ".meta";
}

}  // namespace

TEST_CASE("no image: a get_metadata for a runtime without one gets an error naming it and the path looked for") {
  std::vector<KnownRuntime> known = {{"rt-a", "/img/rt-a.sif", true}, {"rt-b", "/img/rt-b.sif", false}};
  auto h = handle(metadata_request("rt-b"), From::copies, known, "/img", 5);
  REQUIRE(h.take == Take::tell);
  REQUIRE(h.entries.size() == 1);
  CHECK(h.entries[0].first == meta_key("rt-b"));
  CHECK(nlohmann::json::parse(h.entries[0].second).at("error") == h.message);
  CHECK(h.message.find("runtime 'rt-b' has no image: looked for /img/rt-b.sif") != std::string::npos);
  CHECK(h.message.find("lithops-hpc runtime build rt-b") != std::string::npos);
  CHECK(h.storage.at("redis").at("host") == "127.0.0.1");
  CHECK(h.runtime.empty());
  // Its copy for a runtime with an image is dropped (its deployments answer);
  // in the task queue it is left for them; in a runtime's queue every copy is dropped.
  CHECK(handle(metadata_request("rt-a"), From::copies, known, "/img", 5).take == Take::drop);
  CHECK(handle(metadata_request("rt-a"), From::task_queue, known, "/img", 5).take == Take::leave);
  CHECK(handle(metadata_request("rt-b"), From::runtime_queue, known, "/img", 5).take == Take::drop);
  // A runtime nobody knows: the message cannot name it, it names the path pattern.
  auto u = handle(metadata_request("mystery"), From::task_queue, known, "/img", 5);
  REQUIRE(u.take == Take::tell);
  CHECK(u.message.find("looked for /img/<runtime>.sif; runtimes with an image: rt-a") != std::string::npos);
  CHECK(u.entries.at(0).first == meta_key("mystery"));
}

TEST_CASE("no image: each call of a task of a runtime without one gets Lithops' failed status; others stay") {
  std::vector<KnownRuntime> known = {{"rt-a", "/img/rt-a.sif", true}, {"rt-b", "/img/rt-b.sif", false}};
  auto h = handle(task_for("rt-b", 2), From::task_queue, known, "/img", 1234.5);
  REQUIRE(h.take == Take::tell);
  CHECK(h.runtime == "rt-b");
  CHECK(h.storage == nlohmann::json{{"backend", "redis"}, {"redis", {{"host", "127.0.0.1"}, {"port", 6380}}}});
  REQUIRE(h.entries.size() == 2);
  CHECK(h.entries[1].first == "lithops.jobs/A000-M001/00001/status.json");  // create_status_key
  auto st = nlohmann::json::parse(h.entries[1].second);
  CHECK(st.at("type") == "__end__");
  CHECK(st.at("exception") == true);
  CHECK(st.at("call_id") == "00001");
  CHECK(st.at("executor_id") == "A000");
  CHECK(st.at("job_id") == "M001");
  CHECK(st.at("worker_end_tstamp") == 1234.5);  // the future computes the exec time from both
  CHECK(st.at("exc_info") == exception_pickle_repr(h.message));
  CHECK(h.message.find("runtime 'rt-b' has no image: looked for /img/rt-b.sif") != std::string::npos);
  // From its runtime's queue the same.
  CHECK(handle(task_for("rt-b", 1), From::runtime_queue, known, "/img", 1).entries.size() == 1);
  // A runtime not known by name: its image path by sif_path.
  auto u = handle(task_for("rt-z", 1), From::task_queue, known, "/img", 1);
  CHECK(u.message.find("runtime 'rt-z' has no image: looked for /img/rt-z.sif") != std::string::npos);
  CHECK(handle(task_for("rt-a", 1), From::task_queue, known, "/img", 1).take == Take::leave);
  CHECK(handle(task_for("../x", 1), From::task_queue, known, "/img", 1).take == Take::leave);
  CHECK(handle(task_for("rt-b", 1), From::copies, known, "/img", 1).take == Take::drop);
  CHECK(handle("not json", From::task_queue, known, "/img", 1).take == Take::leave);
  CHECK(handle("not json", From::copies, known, "/img", 1).take == Take::drop);
}

TEST_CASE("no image: the exception is a protocol-0 pickle the client evals and loads, whatever the message holds") {
  // pickle.loads(eval(...)) gives (Exception, Exception(message), None)
  // (checked with Python 3.11 by the integration case no-image).
  CHECK(exception_pickle_repr("no 'x'") == R"(b'(cbuiltins\nException\ncbuiltins\nException\n(Vno \'x\'\ntRNt.')");
  // A backslash or newline is escaped as raw-unicode-escape, then as bytes.
  CHECK(exception_pickle_repr("a\\b\nc") ==
        R"(b'(cbuiltins\nException\ncbuiltins\nException\n(Va\\u005cb\\u000ac\ntRNt.')");
}

TEST_CASE("no image: the error is what the client reads as metadata without 'preinstalls', in ASCII") {
  auto body = metadata_error_body("runtime 'rt-b' has no image \xc3\xa9");
  auto j = nlohmann::json::parse(body);
  CHECK_FALSE(j.contains("preinstalls"));
  CHECK(j.at("error").get<std::string>().starts_with("runtime 'rt-b' has no image"));
  CHECK(std::all_of(body.begin(), body.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; }));
}

TEST_CASE("no image: the client's redis is named by its storage configuration; another backend is a reason") {
  nlohmann::json st = {{"backend", "redis"}, {"redis", {{"host", "login1"}, {"port", 6390}, {"password", "pw"}}}};
  auto t = std::get<RedisTarget>(redis_target(st));
  CHECK(t.host == "login1");
  CHECK(t.port == 6390);
  CHECK(t.password == "pw");
  CHECK(t.bucket == "storage");  // what Lithops' redis config sets
  st["redis"]["storage_bucket"] = "b2";
  CHECK(std::get<RedisTarget>(redis_target(st)).bucket == "b2");
  CHECK(std::get<RedisTarget>(redis_target(st)).tls_cert.empty());
  st["redis"]["ssl"] = true;  // up's section with the broker's TLS
  CHECK(std::holds_alternative<std::string>(redis_target(st)));
  st["redis"]["ssl_ca_certs"] = "/home/u/.lithops-hpc/services/tls/cert.pem";
  CHECK(std::get<RedisTarget>(redis_target(st)).tls_cert == "/home/u/.lithops-hpc/services/tls/cert.pem");
  st["backend"] = "aws_s3";
  auto why = std::get<std::string>(redis_target(st));
  CHECK(why.find("'aws_s3'") != std::string::npos);
  CHECK(why.find("pw") == std::string::npos);
  st = {{"backend", "redis"}, {"redis", {{"port", 6379}}}};
  CHECK(std::holds_alternative<std::string>(redis_target(st)));
}

TEST_CASE("no image: a key is put as Lithops' redis backend puts it: each parent directory, then the value") {
  using C = std::vector<std::vector<std::string>>;
  CHECK(redis_put_commands("storage", "lithops.jobs/E-J/00000/status.json", "v") ==
        C{{"SADD", "storage/", "lithops.jobs/"},
          {"SADD", "storage/lithops.jobs/", "E-J/"},
          {"SADD", "storage/lithops.jobs/E-J/", "00000/"},
          {"SADD", "storage/lithops.jobs/E-J/00000/", "status.json"},
          {"SET", "storage/lithops.jobs/E-J/00000/status.json", "v"}});
}

TEST_CASE("controller: no runtime has an image: a get_metadata in the task queue is answered with the error") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}});
  l.w.task_msgs = {metadata_request("rt-a")};
  l.poll();
  CHECK(l.submitted() == 0);
  REQUIRE(l.w.puts.size() == 1);
  CHECK(l.w.puts[0].key == meta_key("rt-a"));
  CHECK(l.w.puts[0].storage.at("redis").at("port") == 6380);
  auto err = nlohmann::json::parse(l.w.puts[0].value).at("error").get<std::string>();
  CHECK(err.find("runtime 'rt-a' has no image: looked for /img/rt-a.sif") != std::string::npos);
  CHECK(l.w.task_msgs.empty());  // acked
  // A task of it (the client had its metadata from before): each call's status
  // says it failed, and the queue behind it is read on.
  l.w.task_msgs = {task_for("rt-a", 2), metadata_request("rt-a")};
  l.poll();
  REQUIRE(l.w.puts.size() == 4);
  CHECK(l.w.puts[1].key == "lithops.jobs/A000-M001/00000/status.json");
  CHECK(l.w.puts[2].key == "lithops.jobs/A000-M001/00001/status.json");
  CHECK(l.w.puts[2].storage.at("backend") == "redis");
  CHECK(l.w.puts[3].key == meta_key("rt-a"));
  CHECK(l.w.task_msgs.empty());
  CHECK(l.w.moved.empty());
  CHECK(l.ctl->state().polls == 2);  // what the integration suites count, not the broker queries
  l.start();
  CHECK(l.ctl->state().polls == 2);
}

TEST_CASE("controller: tasks whose client cannot be told wait in their runtime's queue, reported there") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}});
  l.w.store_refuses = "the client's storage backend is 'aws_s3'";
  l.w.task_msgs = {task_for("rt-a"), metadata_request("rt-a")};
  l.poll();
  REQUIRE(l.w.moved.size() == 1);
  CHECK(l.w.moved[0].first == "rt-a");
  CHECK(l.w.task_msgs.empty());  // the get_metadata behind it: taken, its error not written either
  // Moved, its tasks are not taken from there again while nobody can be told.
  l.w.runtime_queues["rt-a"] = {1, 0};
  l.w.runtime_msgs["rt-a"] = {task_for("rt-a")};
  l.poll();
  CHECK(l.w.runtime_msgs["rt-a"].size() == 1);
  // With a storage to tell, what waits there fails too; not while something consumes it.
  l.w.store_refuses.reset();
  l.w.runtime_queues["rt-a"] = {1, 1};
  l.poll();
  CHECK(l.w.runtime_msgs["rt-a"].size() == 1);
  l.w.runtime_queues["rt-a"] = {1, 0};
  l.poll();
  CHECK(l.w.runtime_msgs["rt-a"].empty());
  REQUIRE(l.w.puts.size() == 1);
  CHECK(l.w.puts[0].key == "lithops.jobs/A000-M001/00000/status.json");
}

TEST_CASE("controller: the task queue is left alone while anything else could take it") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}});
  SUBCASE("a move not confirmed puts the task back and stops") {
    l.w.move_fails = true;
    l.w.store_refuses = "the client's storage backend is 'aws_s3'";
    l.w.task_msgs = {task_for("rt-a"), metadata_request("rt-a")};
    l.poll();
    CHECK(l.w.task_msgs.size() == 2);
    CHECK(l.w.puts.empty());
  }
  SUBCASE("a consumer on the task queue (someone's deployment)") {
    l.w.queue = QueueLook{0, 1};
    l.w.task_msgs = {metadata_request("rt-a")};
    l.poll();
    CHECK(l.w.task_msgs.size() == 1);
    CHECK(l.w.puts.empty());
  }
  SUBCASE("a request for an image in sif_path stays, and so does what is behind it") {
    l.w.sif_dir = {"rt-c"};
    l.w.images.insert("/img/rt-c.sif");
    l.w.task_msgs = {metadata_request("rt-c"), metadata_request("rt-a")};
    l.poll();
    CHECK(l.w.task_msgs.size() == 2);
    CHECK(l.w.puts.empty());
  }
  SUBCASE("a deployment is submitted for the task queue: it takes the request") {
    l.s.runtimes = {{"rt-b", "/img/rt-b.sif"}, {"rt-a", "/img/rt-a.sif"}};
    l.w.images.insert("/img/rt-b.sif");
    l.start();
    l.w.task_msgs = {metadata_request("rt-a")};
    l.poll();
    CHECK(l.submitted() == 1);
    CHECK(l.w.task_msgs.size() == 1);
    CHECK(l.w.puts.empty());
  }
}

TEST_CASE("controller: the first runtime has no image, another has: nothing takes the task queue, so it is answered") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}, {"rt-b", "/img/rt-b.sif"}});
  l.w.images = {"/img/rt-b.sif"};
  l.w.task_msgs = {metadata_request("rt-a")};
  l.poll();
  CHECK(l.submitted() == 0);
  REQUIRE(l.w.puts.size() == 1);
  CHECK(l.w.puts[0].key == meta_key("rt-a"));
  CHECK(l.w.task_msgs.empty());
}

TEST_CASE("controller: a copy of a get_metadata is answered when its runtime has no image, dropped otherwise") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}, {"rt-b", "/img/rt-b.sif"}});
  l.w.images = {"/img/rt-a.sif"};
  l.w.copy_msgs = {metadata_request("rt-a"), metadata_request("rt-b"), metadata_request("singularity-runtime-v311")};
  l.poll();
  CHECK(l.w.copy_msgs.empty());
  REQUIRE(l.w.puts.size() == 2);
  CHECK(l.w.puts[0].key == meta_key("rt-b"));
  CHECK(l.w.puts[1].key == meta_key("singularity-runtime-v311"));
  auto err = nlohmann::json::parse(l.w.puts[1].value).at("error").get<std::string>();
  CHECK(err.find("runtime 'singularity-runtime-v311' has no image: looked for /img/singularity-runtime-v311.sif") !=
        std::string::npos);
  CHECK(l.w.acked.size() == 3);
  // The storage refusing is logged; the copy is not taken again.
  l.w.store_refuses = "redis at 127.0.0.1:6380 did not take key";
  l.w.copy_msgs = {metadata_request("rt-b")};
  l.poll();
  CHECK(l.w.copy_msgs.empty());
}

TEST_CASE("controller: a runtime learned from a deployment's notice has its tasks failed while it has no image") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}});
  l.w.images = {"/img/rt-a.sif"};
  l.w.sif_dir = {"rt-a"};
  l.w.runtime_msgs["rt-z"] = {task_for("rt-z", 2)};
  l.w.runtime_msgs["rt-a"] = {task_for("rt-a")};
  l.poll();  // no notice yet: the controller cannot know rt-z's queue
  CHECK(l.w.runtime_msgs["rt-z"].size() == 1);
  CHECK(l.w.puts.empty());
  l.w.copy_msgs = {"wanted:rt-a", "wanted:rt-z", "wanted:not a runtime"};
  l.poll();
  CHECK(l.w.copy_msgs.empty());
  CHECK(l.w.acked.size() >= 3);
  CHECK(l.w.runtime_msgs["rt-z"].empty());
  CHECK(l.w.runtime_msgs["rt-a"].size() == 1);  // it has an image: its deployments' to take
  REQUIRE(l.w.puts.size() == 2);
  CHECK(l.w.puts[0].key == "lithops.jobs/A000-M001/00000/status.json");
  CHECK(l.w.puts[1].key == "lithops.jobs/A000-M001/00001/status.json");
  auto st = nlohmann::json::parse(l.w.puts[0].value);
  CHECK(st.at("exception") == true);
  CHECK(st.at("exc_info").get<std::string>().find("rt-z\\' has no image: looked for /img/rt-z.sif") !=
        std::string::npos);
  // Remembered: what comes later for it fails too, without another notice.
  l.w.runtime_msgs["rt-z"] = {task_for("rt-z")};
  l.poll();
  CHECK(l.w.runtime_msgs["rt-z"].empty());
  CHECK(l.w.puts.size() == 3);
  // Its image appears: forgotten, its tasks wait for a deployment.
  l.w.images.insert("/img/rt-z.sif");
  l.w.sif_dir.push_back("rt-z");
  l.w.runtime_msgs["rt-z"] = {task_for("rt-z")};
  l.poll();
  CHECK(l.w.runtime_msgs["rt-z"].size() == 1);
  CHECK(l.w.puts.size() == 3);
}

TEST_CASE("controller: at zero with no image, a get_metadata is answered within the short look, even with --poll 60") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}});
  l.s.poll = 60;
  l.start();
  double published = l.w.t + 17.2;
  for (int i = 0; i < 1000; ++i) {
    double wait = l.ctl->tick();
    if (!l.w.puts.empty()) {
      break;
    }
    l.w.t += wait;
    if (l.w.t >= published && l.w.task_msgs.empty()) {
      l.w.task_msgs = {metadata_request("rt-a")};
    }
  }
  REQUIRE(l.w.puts.size() == 1);
  CHECK(l.w.t - published <= k_zero_look);
}

// ------------------------------------------------------- the local scheduler

TEST_CASE("local: /proc/<pid>/stat is read after the last ')', whatever the command name holds") {
  auto st = parse_proc_stat(
      "4242 (a) b (c)) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 184467 1 1 0\n");
  REQUIRE(st);
  CHECK(st->state == 'S');
  CHECK(st->pgrp == 4240);
  CHECK(st->start_ticks == 987654);
  CHECK_FALSE(parse_proc_stat("4242 (cut"));
  CHECK_FALSE(parse_proc_stat("4242 (x) S 1 2 3"));
  CHECK_FALSE(parse_proc_stat("4242 (x) S 1 4x 0 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000"));
}

TEST_CASE("local: a job lives while its group does; a group number reused by another process is not ours") {
  LocalRecord r{"local-1-2-1", "lithops-aa-1", 4240, 987654, 1, "/o"};
  CHECK_FALSE(group_alive(r, false, std::nullopt));                // no process left, or none of ours
  CHECK(group_alive(r, true, ProcStat{'S', 4240, 987654}));        // mpirun runs
  CHECK(group_alive(r, true, std::nullopt));                       // mpirun gone, others of its group still run
  CHECK_FALSE(group_alive(r, true, ProcStat{'S', 4240, 123}));     // another process got the number
  CHECK_FALSE(group_alive(r, true, ProcStat{'Z', 4240, 987654}));  // ended, not reaped yet
}

TEST_CASE("local: job ids are plain names; the deployment runs mpirun with an explicit argv, no copy of the image") {
  auto id = local_job_id(1765000000, 321, 7);
  CHECK(id == "local-1765000000-321-7");
  CHECK_NOTHROW(lhpc::check_path_component("id", id));
  LocalOptions o{"/opt/lithops-hpc", "/s/records", "mpirun", {"--oversubscribe"}};
  Submission s{"/img/rt.sif", 2, "lithops-aa-1", "/s/out", "/c.toml"};
  CHECK(local_argv(o, s) == std::vector<std::string>{"mpirun", "-n", "2", "--oversubscribe", "/opt/lithops-hpc",
                                                     "deploy", "--sif", "/img/rt.sif", "--transfer", "none"});
  CHECK(local_output("/s/out", id) == "/s/out/lithops-workers-" + id + ".out");
}

TEST_CASE("local: a record round-trips; a broken one is skipped, not fatal") {
  LocalRecord r{"local-1-2-3", "lithops-aa-9", 77, 55, 2, "/o/x.out"};
  auto back = local_record_from_json(to_json(r), "r.json");
  REQUIRE(back);
  CHECK(back->id == r.id);
  CHECK(back->name == r.name);
  CHECK(back->pgid == 77);
  CHECK(back->start_ticks == 55);
  CHECK(back->nodes == 2);
  CHECK(back->output == r.output);
  CHECK_FALSE(local_record_from_json("{", "r.json"));
  CHECK_FALSE(
      local_record_from_json(R"({"id":"../x","name":"n","pgid":7,"start_ticks":1,"nodes":1,"output":"o"})", "r.json"));
  CHECK_FALSE(local_record_from_json(R"({"id":"a","name":"n","pgid":1,"start_ticks":1,"nodes":1,"output":"o"})",
                                     "r.json"));  // never signal init's group
  CHECK_FALSE(
      local_record_from_json(R"({"id":"a","name":"n","pgid":7.5,"start_ticks":1,"nodes":1,"output":"o"})", "r.json"));
}

namespace {

bool eventually(const std::function<bool()>& cond) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) {
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

}  // namespace

TEST_CASE("local: a started job is alive, found by name by a restarted controller, and ends on cancel") {
  lhpc::test::TempDir dir{"local"};
  // The launcher stands in for mpirun: it stays until SIGTERM and leaves its argv in the output.
  auto launcher =
      dir.write("mpirun", "#!/bin/sh\nprintf '%s\\n' \"$*\"; echo job=$LITHOPS_HPC_JOB_ID\nexec sleep 60\n", 0700);
  LocalOptions o{"/bin/lithops-hpc", dir.file("records"), launcher, {}};
  Submission s{"/img/rt.sif", 1, "lithops-aa-test", dir.file("out"), ""};
  std::string id, output;
  {
    LocalScheduler first(o);
    auto res = first.submit(s);
    REQUIRE(res.job);
    id = *res.job;
    output = res.output;
    auto seen = first.query({id, "local-0-0-0"});
    REQUIRE(seen);
    CHECK_FALSE(seen->at(id).ended);
    CHECK_FALSE(seen->at(id).pending);
    CHECK(seen->at(id).nodes == 1);
    CHECK(seen->at("local-0-0-0").ended);  // a job it does not know
    CHECK(first.counters().submissions == 1);
  }  // the controller ends: the deployment keeps running
  LocalScheduler second(o);
  CHECK(second.jobs_named("lithops-aa-test") == std::vector<std::string>{id});
  CHECK(second.jobs_named("lithops-aa-other").empty());
  CHECK(eventually([&] { return lhpc::read_file(output).find("job=" + id) != std::string::npos; }));
  CHECK(lhpc::read_file(output).find("-n 1 /bin/lithops-hpc deploy --sif /img/rt.sif") != std::string::npos);
  second.cancel(id);
  CHECK(eventually([&] { return second.query({id})->at(id).ended; }));
  CHECK(second.jobs_named("lithops-aa-test").empty());
  CHECK_FALSE(lhpc::path_exists(o.records + "/" + id + ".json"));  // an ended job's record goes
}

TEST_CASE("local: a record whose process group number now belongs to another process is an ended job") {
  lhpc::test::TempDir dir{"local"};
  LocalOptions o{"/bin/lithops-hpc", dir.file("records"), "mpirun", {}};
  LocalScheduler sched(o);
  // Our own group: alive and ours, but its leader started at another time than recorded.
  LocalRecord r{"local-1-1-1", "lithops-aa-test", static_cast<long>(::getpgrp()), 1, 1, "/o"};
  lhpc::write_file_atomic(o.records + "/local-1-1-1.json", to_json(r), 0600);
  CHECK(sched.jobs_named("lithops-aa-test").empty());
  CHECK(sched.query({"local-1-1-1"})->at("local-1-1-1").ended);
  sched.cancel("local-1-1-1");  // never signals that group (the test would end)
}

TEST_CASE("controller: from zero the first task brings a submission within the short look, even with --poll 60") {
  Loop l;
  l.s.poll = 60;
  l.start();
  // The loop as run() drives it: each tick says how long to sleep; a task is
  // published 17.2 s after the last poll, in the middle of a sleep.
  double published = l.w.t + 17.2;
  for (int i = 0; i < 1000 && l.submitted() == 0; ++i) {
    double wait = l.ctl->tick();
    if (l.submitted() == 0) {
      l.w.t += wait;
      if (l.w.t >= published) {
        l.w.ready(1);
      }
    }
  }
  REQUIRE(l.submitted() == 1);
  CHECK(l.w.t - published <= k_zero_look);
  // Something is held: the controller looks again at --poll, not at the short cadence.
  CHECK(l.ctl->tick() == doctest::Approx(60).epsilon(0.01));
}

TEST_CASE("controller: from zero the first task in a runtime's queue brings its submission within the short look") {
  Loop l(limits(), {{"rt-a", "/img/rt-a.sif"}, {"rt-b", "/img/rt-b.sif"}});
  l.w.images = {"/img/rt-a.sif", "/img/rt-b.sif"};
  l.s.poll = 60;
  l.start();
  double published = l.w.t + 17.2;
  for (int i = 0; i < 1000; ++i) {
    double wait = l.ctl->tick();
    if (l.submitted() > 0) {
      break;
    }
    l.w.t += wait;
    if (l.w.t >= published) {
      l.w.runtime_queues["rt-b"] = {1, 0};  // moved there by a deployment this controller does not hold
    }
  }
  REQUIRE(l.submitted() == 1);
  CHECK(l.w.submissions[0].runtime == "rt-b");
  CHECK(l.w.t - published <= k_zero_look);
}

TEST_CASE("controller: at zero, a backlog the last poll saw already waits for the next poll, not every look") {
  Loop l;
  l.s.poll = 60;
  l.start();
  l.w.refuse = "QOSMaxSubmitJobPerUserLimit";  // the submission is refused: backoff, still at zero
  l.w.ready(5);
  l.ctl->tick();
  REQUIRE(l.submitted() == 1);
  auto updated = l.ctl->state().updated;
  for (int i = 0; i < 20; ++i) {
    l.w.t += l.ctl->tick();  // short looks at the queue only
  }
  CHECK(l.ctl->state().updated == updated);  // no poll since
  CHECK(l.submitted() == 1);
}
