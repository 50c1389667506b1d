// The autoalloc controller's decisions as data: a demand/supply snapshot in,
// actions out (policy.h), plus the sbatch argv, Slurm time parsing and the
// state file's round trip. The controller's I/O is covered by
// tests/integration/test_autoalloc.py on the Slurm rig.
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "autoalloc/controller.h"
#include "autoalloc/policy.h"
#include "autoalloc/scheduler.h"
#include "util/error.h"

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
  SubmitRequest r{"/s/lithops-deploy.sh",       "/img/rt.sif", 2, "0:30:00", "lithops-aa-1", "/st/out/w-%j.out",
                  {"--partition=p", "--qos=q"}, "/cfg.toml"};
  std::vector<std::string> want = {"sbatch",        "--parsable",     "--job-name=lithops-aa-1",
                                   "--nodes=2",     "--time=0:30:00", "--output=/st/out/w-%j.out",
                                   "--partition=p", "--qos=q",        "/s/lithops-deploy.sh",
                                   "/img/rt.sif",   "--cleanup"};
  CHECK(sbatch_argv(r) == want);
  for (const auto& a : sbatch_argv(r)) {
    CHECK(a.find("amqp") == std::string::npos);
  }
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
