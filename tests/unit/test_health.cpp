// Health: the report on the wire, the table rank 0 keeps (aging, change log),
// the status file contract, how `status` judges it, and stop requests.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "autoalloc/overview.h"
#include "config/config.h"
#include "health/memory.h"
#include "health/report.h"
#include "health/status_file.h"
#include "health/table.h"
#include "health/view.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"

using lhpc::test::as_nobody;
using lhpc::test::EnvGuard;
using lhpc::test::SharedDir;
using lhpc::test::TempDir;
using namespace lhpc;
using namespace lhpc::health;
using nlohmann::json;

namespace {

// A state dir of our own, and no job id from the environment.
struct StateDir {
  TempDir dir{"health"};
  EnvGuard state{"LITHOPS_HPC_STATE_DIR", nullptr};
  EnvGuard slurm{"SLURM_JOB_ID", nullptr};
  EnvGuard local{"LITHOPS_HPC_JOB_ID", nullptr};
  StateDir() { ::setenv("LITHOPS_HPC_STATE_DIR", dir.str().c_str(), 1); }
};

struct FakeClock {
  double mono = 1000;
  double wall = 1700000000;
  Clock clock() {
    return Clock{.mono = [this] { return mono; }, .wall = [this] { return wall; }};
  }
  void advance(double s) {
    mono += s;
    wall += s;
  }
};

Report report_of(int rank, State s, std::uint64_t seq, const std::string& node) {
  Report r;
  r.rank = rank;
  r.seq = seq;
  r.state = s;
  r.pid = 100 + rank;
  r.slots_busy = 1;
  r.slots_total = 4;
  r.done = 10;
  r.failed = 1;
  r.requeued = 2;
  r.dead_lettered = 3;
  r.broker_connected = 1;
  r.consuming = 1;
  r.instance_alive = 1;
  r.rss_kb = 2048;
  r.rss_tree_kb = 4096;
  set_node(r, node);
  return r;
}

struct Logged {
  std::vector<std::pair<Table::Level, std::string>> lines;
  Table::LogFn fn() {
    return [this](Table::Level l, const std::string& s) { lines.emplace_back(l, s); };
  }
  bool has(const std::string& s) const {
    for (const auto& [l, line] : lines) {
      if (line == s) {
        return true;
      }
    }
    return false;
  }
};

// A table of `n` ranks, all ready, at the fake clock's time.
Table ready_table(FakeClock& fc, int n, double interval = 5) {
  Table t({.job = "42", .runtime = "rt-a", .ranks = n, .interval = interval, .rank0_host = "n1", .rank0_pid = 4242},
          fc.clock());
  t.set_logger([](Table::Level, const std::string&) {});
  for (int i = 0; i < n; ++i) {
    t.update(report_of(i, State::ready, 1, "n" + std::to_string(i + 1)));
  }
  return t;
}

std::set<std::string> keys_of(const json& j) {
  std::set<std::string> out;
  for (const auto& [k, v] : j.items()) {
    out.insert(k);
  }
  return out;
}

}  // namespace

TEST_CASE("a report is a fixed block of bytes that survives a byte copy") {
  CHECK(std::is_trivially_copyable_v<Report>);
  CHECK(sizeof(Report) == 1112);
  Report a = report_of(3, State::draining, 7, "node-7");
  set_last_error(a, "boom");
  unsigned char wire[sizeof(Report)];
  std::memcpy(wire, &a, sizeof a);
  Report b;
  std::memcpy(&b, wire, sizeof b);
  CHECK(valid(b));
  CHECK(b.rank == 3);
  CHECK(b.seq == 7);
  CHECK(b.state == State::draining);
  CHECK(node_of(b) == "node-7");
  CHECK(last_error_of(b) == "boom");
}

TEST_CASE("state names are lower case and parse back") {
  for (auto s : {State::staging, State::starting, State::ready, State::draining, State::failed, State::stopped,
                 State::unresponsive, State::reconnecting}) {
    auto name = std::string(k_state_names.text(s));
    for (char c : name) {
      CHECK(!(c >= 'A' && c <= 'Z'));
    }
    CHECK(k_state_names.parse(name) == s);
  }
  CHECK(k_state_names.text(State::unresponsive) == "unresponsive");
  CHECK(!k_state_names.parse("Ready"));
}

TEST_CASE("a report with a wrong version, a negative rank or an unknown state is invalid") {
  Report r = report_of(1, State::ready, 1, "n");
  CHECK(valid(r));
  r.version = 99;
  CHECK(!valid(r));
  r = report_of(1, State::ready, 1, "n");
  r.state = State::unresponsive;  // rank 0's verdict, never sent
  CHECK(!valid(r));
  r.state = static_cast<State>(200);
  CHECK(!valid(r));
  r.state = State::reconnecting;  // running, consuming nothing: sent
  CHECK(valid(r));
  r = report_of(-1, State::ready, 1, "n");
  CHECK(!valid(r));
}

TEST_CASE("last_error never carries an AMQP password") {
  Report r;
  set_last_error(r, "connect to amqp://lithops:hunter2@broker:5672/prod failed: refused");
  CHECK(last_error_of(r) == "connect to amqp://lithops:***@broker:5672/prod failed: refused");

  SUBCASE("amqps, upper case, several URLs, quotes") {
    auto out = redact_secrets("AMQPS://u:pw1@h/v and 'amqp://x:pw2@k:1/'");
    CHECK(out.find("pw1") == std::string::npos);
    CHECK(out.find("pw2") == std::string::npos);
    CHECK(out == "AMQPS://u:***@h/v and 'amqp://x:***@k:1/'");
  }
  SUBCASE("matches config::redact_url on well-formed URLs") {
    std::string url = "amqp://user:p%40ss@host:5672/%2Fvh";
    CHECK(redact_secrets(url) == config::redact_url(url));
  }
  SUBCASE("a raw '/' or '@' in the password is hidden too") {
    auto out = redact_secrets("url amqp://u:pa/ss@host/v end");
    CHECK(out.find("pa/ss") == std::string::npos);
    CHECK(out == "url amqp://u:***@host/v end");
    auto out2 = redact_secrets("amqp://u:p@ss@host/v");
    CHECK(out2 == "amqp://u:***@host/v");
  }
  SUBCASE("a user without password and text without URLs are unchanged") {
    CHECK(redact_secrets("amqp://guest@host/") == "amqp://guest@host/");
    CHECK(redact_secrets("no url: a:b@c") == "no url: a:b@c");
  }
  SUBCASE("a URL cut by truncation still shows no password") {
    std::string pad(140, 'x');
    set_last_error(r, pad + " amqp://user:supersecretpassword@host/v");
    auto got = last_error_of(r);
    CHECK(got.size() <= 159);
    CHECK(got.find("supersecret") == std::string::npos);
    CHECK(got.find("super") == std::string::npos);
  }
}

TEST_CASE("last_error is truncated on a UTF-8 boundary, NUL-terminated, on one line") {
  Report r;
  std::string text;
  for (int i = 0; i < 200; ++i) {
    text += "\xC3\xA9";  // é, two bytes
  }
  set_last_error(r, text);
  auto got = last_error_of(r);
  CHECK(got.size() <= 159);
  CHECK(r.last_error[159] == '\0');
  CHECK(got.substr(got.size() - 3) == "...");
  auto body = got.substr(0, got.size() - 3);
  CHECK(body.size() % 2 == 0);  // whole characters only
  set_last_error(r, "line one\nline two\r\tend");
  CHECK(last_error_of(r) == "line one line two  end");
  CHECK(truncate_utf8("short", 10) == "short");
  CHECK(truncate_utf8("0123456789", 8) == "01234...");
}

TEST_CASE("node names are cut at 63 bytes and read back without a terminator") {
  Report r;
  set_node(r, std::string(100, 'n'));
  CHECK(node_of(r).size() == 63);
  std::memset(r.node, 'z', sizeof r.node);  // a corrupt report without NUL
  CHECK(node_of(r).size() == 64);
  std::memset(r.last_error, 'e', sizeof r.last_error);
  CHECK(last_error_of(r).size() == 160);
}

TEST_CASE("memory: the rank's own RSS, and its process tree's") {
  auto m = read_memory();
  CHECK(m.self_kb > 0);
  CHECK(m.tree_kb >= m.self_kb);
  auto child = spawn({.argv = {"sh", "-c", "sleep 5 & sleep 5; wait"}, .new_process_group = true});
  // Wait until the children count: /proc shows the tree as it forms. Both
  // numbers come from one reading, since our own RSS grows meanwhile.
  auto now = read_memory();
  for (int i = 0; i < 200 && now.tree_kb <= now.self_kb; ++i) {
    ::usleep(10000);
    now = read_memory();
  }
  CHECK(now.tree_kb > now.self_kb);
  CHECK(read_memory(child.pid()).self_kb > 0);
  child.terminate(std::chrono::milliseconds(500));
}

TEST_CASE("a rank silent for 3 intervals becomes unresponsive, and ready again when it reports") {
  FakeClock fc;
  Logged log;
  Table t = ready_table(fc, 3, 5);
  t.set_logger(log.fn());
  fc.advance(14.9);
  t.update(report_of(0, State::ready, 2, "n1"));
  t.update(report_of(1, State::ready, 2, "n2"));
  t.age();
  CHECK(t.entries()[2].shown == State::ready);
  fc.advance(0.3);
  t.age();
  CHECK(t.entries()[2].shown == State::unresponsive);
  CHECK(t.entries()[0].shown == State::ready);
  CHECK(log.has("rank 2 n3: ready -> unresponsive (no report for 15.2 s)"));
  CHECK(log.lines.back().first == Table::Level::warn);
  CHECK(t.take_changed());
  CHECK(!t.take_changed());
  auto s = t.summary();
  CHECK(s.ready == 2);
  CHECK(s.unresponsive == 1);
  CHECK(s.degraded == 0);

  fc.advance(2);
  t.update(report_of(2, State::ready, 2, "n3"));
  CHECK(t.entries()[2].shown == State::ready);
  CHECK(log.has("rank 2 n3: unresponsive -> ready (report after 17.2 s of silence)"));
  t.age();
  CHECK(t.entries()[2].shown == State::ready);
}

TEST_CASE("every state change is logged, failures with their last error") {
  FakeClock fc;
  Logged log;
  Table t({.job = "7", .ranks = 2, .interval = 1}, fc.clock());
  t.set_logger(log.fn());
  t.update(report_of(1, State::staging, 1, "n2"));
  CHECK(log.has("rank 1 n2: first report: staging"));
  t.update(report_of(1, State::starting, 2, "n2"));
  t.update(report_of(1, State::ready, 3, "n2"));
  CHECK(log.has("rank 1 n2: staging -> starting"));
  CHECK(log.has("rank 1 n2: starting -> ready"));
  auto lines = log.lines.size();
  t.update(report_of(1, State::ready, 4, "n2"));
  CHECK(log.lines.size() == lines);  // no change, no line
  auto f = report_of(1, State::failed, 5, "n2");
  set_last_error(f, "instance died 5 times");
  t.update(f);
  CHECK(log.has("rank 1 n2: ready -> failed: instance died 5 times"));
  CHECK(log.lines.back().first == Table::Level::warn);
  SUBCASE("an older report is ignored") {
    CHECK(!t.update(report_of(1, State::ready, 4, "n2")));
    CHECK(t.entries()[1].shown == State::failed);
  }
  SUBCASE("a rank out of range is ignored") { CHECK(!t.update(report_of(5, State::ready, 1, "n6"))); }
  SUBCASE("a rank that never reported goes unresponsive too") {
    fc.advance(3);
    t.age();
    CHECK(t.entries()[0].shown == State::unresponsive);
    CHECK(log.has("rank 0: starting -> unresponsive (no report at all in 3.0 s)"));
  }
}

TEST_CASE("a rank that reported stopped is silent on purpose and never ages") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 1);
  t.update(report_of(1, State::stopped, 2, "n2"));
  fc.advance(100);
  t.age();
  CHECK(t.entries()[1].shown == State::stopped);
  CHECK(t.entries()[0].shown == State::unresponsive);
  CHECK(t.ranks_not_reporting(State::stopped) == std::vector<int>{0});
}

TEST_CASE("the status JSON has exactly the documented keys and types") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 5);
  auto r1 = report_of(1, State::failed, 2, "n2");
  set_last_error(r1, "oops amqp://a:b@c/d");
  r1.uptime = 12.345;
  t.update(r1);
  fc.advance(1.25);
  t.set_state(DeploymentState::draining);
  auto doc = json::parse(t.to_json());

  CHECK(keys_of(doc) == std::set<std::string>{"job", "runtime", "version", "updated", "started", "interval", "rank0",
                                              "summary", "state", "ranks"});
  CHECK(doc["job"] == "42");
  CHECK(doc["runtime"] == "rt-a");
  CHECK(doc["version"] == 1);
  CHECK(doc["updated"].get<double>() == doctest::Approx(1700000001.25));
  CHECK(doc["started"].get<double>() == doctest::Approx(1700000000));
  CHECK(doc["interval"] == 5.0);
  CHECK(doc["rank0"] == json{{"host", "n1"}, {"pid", 4242}});
  CHECK(doc["state"] == "draining");
  CHECK(keys_of(doc["summary"]) == std::set<std::string>{"ranks", "ready", "degraded", "unresponsive", "slots_busy",
                                                         "slots_total", "done", "failed", "requeued", "dead_lettered",
                                                         "duplicates"});
  CHECK(doc["summary"]["ranks"] == 2);
  CHECK(doc["summary"]["ready"] == 1);
  CHECK(doc["summary"]["degraded"] == 1);
  CHECK(doc["summary"]["unresponsive"] == 0);
  CHECK(doc["summary"]["slots_busy"] == 2);
  CHECK(doc["summary"]["slots_total"] == 8);
  CHECK(doc["summary"]["done"] == 20);
  CHECK(doc["summary"]["dead_lettered"] == 6);
  REQUIRE(doc["ranks"].size() == 2);
  const auto& r = doc["ranks"][1];
  CHECK(keys_of(r) ==
        std::set<std::string>{"rank",        "node",         "pid",       "state",     "reported_state", "slots_busy",
                              "slots_total", "done",         "failed",    "requeued",  "dead_lettered",  "duplicates",
                              "broker",      "consuming",    "blocked",   "instance",  "restarts",       "rss_kb",
                              "rss_tree_kb", "uptime",       "seq",       "last_seen", "last_error",     "gpus",
                              "gpus_out",    "gpus_out_why", "gpu_memory"});
  CHECK(r["rank"] == 1);
  CHECK(r["node"] == "n2");
  CHECK(r["pid"] == 101);
  CHECK(r["state"] == "failed");
  CHECK(r["broker"] == true);
  CHECK(r["instance"] == true);
  CHECK(r["rss_kb"] == 2048);
  CHECK(r["rss_tree_kb"] == 4096);
  CHECK(r["uptime"].get<double>() == doctest::Approx(12.3));
  CHECK(r["seq"] == 2);
  CHECK(r["last_seen"].get<double>() == doctest::Approx(1.3).epsilon(0.05));
  CHECK(r["last_error"] == "oops amqp://a:***@c/d");
  // The document the library writes is the one the view reads.
  auto view = parse_status(doc.dump(), "status.json");
  CHECK(view.ranks.size() == 2);
  CHECK(view.summary.degraded == 1);

  SUBCASE("ranks keep their last known values when unresponsive, with reported_state") {
    fc.advance(20);
    t.age();
    auto d = json::parse(t.to_json());
    CHECK(d["ranks"][0]["state"] == "unresponsive");
    CHECK(d["ranks"][0]["reported_state"] == "ready");
    CHECK(d["ranks"][0]["done"] == 10);
  }
  SUBCASE("a rank with no report yet has the same keys, with nulls") {
    Table fresh({.job = "1", .ranks = 2, .interval = 5}, fc.clock());
    auto d = json::parse(fresh.to_json());
    CHECK(keys_of(d["ranks"][1]) == keys_of(r));
    CHECK(d["ranks"][1]["state"] == "starting");
    CHECK(d["ranks"][1]["last_seen"].is_null());
    CHECK(d["ranks"][1]["reported_state"].is_null());
    CHECK(parse_status(d.dump(), "x").ranks[1].last_seen == std::nullopt);
  }
}

TEST_CASE("status exit codes: ready 0, degraded 1, unresponsive 1, stale 1, ended 1") {
  FakeClock fc;
  Table t = ready_table(fc, 3, 5);
  auto judge = [&](double read_after = 0) {
    auto v = parse_status(t.to_json(), "s");
    return assess(v, fc.wall + read_after);
  };
  CHECK(judge().code == Exit::ok);
  CHECK(judge().headline.find("3/3 ranks ready") != std::string::npos);
  CHECK(judge().headline.find("job 42 (runtime rt-a): running") == 0);
  CHECK(parse_status(t.to_json(), "s").runtime == "rt-a");

  SUBCASE("degraded: a rank starting") {
    t.update(report_of(1, State::starting, 2, "n2"));
    auto a = judge();
    CHECK(a.code == Exit::failure);
    CHECK(a.headline.find("DEGRADED") != std::string::npos);
  }
  SUBCASE("unresponsive") {
    fc.advance(16);
    t.update(report_of(0, State::ready, 2, "n1"));
    t.update(report_of(1, State::ready, 2, "n2"));
    t.age();
    auto a = judge();
    CHECK(a.code == Exit::failure);
    CHECK(a.headline.find("1 unresponsive") != std::string::npos);
  }
  SUBCASE("stale: rank 0 stopped writing 3 intervals ago") {
    CHECK(judge(14).code == Exit::ok);
    auto a = judge(16);
    CHECK(a.code == Exit::failure);
    CHECK(a.stale);
    CHECK(a.headline.find("rank 0 (n1, pid 4242) stopped updating the status file") != std::string::npos);
  }
  SUBCASE("draining") {
    t.set_state(DeploymentState::draining);
    CHECK(judge().code == Exit::failure);
  }
  SUBCASE("stopped: ended, never stale") {
    for (int i = 0; i < 3; ++i) {
      t.update(report_of(i, State::stopped, 9, "n" + std::to_string(i + 1)));
    }
    t.set_state(DeploymentState::stopped);
    auto a = judge(10000);
    CHECK(a.code == Exit::failure);
    CHECK(!a.stale);
    CHECK(a.headline.find("stopped") != std::string::npos);
  }
}

TEST_CASE("the table a person reads") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 5);
  auto f = report_of(1, State::failed, 2, "n2");
  set_last_error(f, "engine missing");
  t.update(f);
  auto v = parse_status(t.to_json(), "s");
  auto text = render(v, assess(v, fc.wall + 1));
  CHECK(text.find(
            "RANK  NODE  STATE   SLOTS  DONE  FAILED  REQUEUED  BROKER  INSTANCE  RESTARTS  RSS      LAST SEEN") == 0);
  CHECK(
      text.find("0     n1    ready   1/4    10    1       2         yes     yes       0         4.0 MiB  1.0 s ago") !=
      std::string::npos);
  CHECK(text.find("rank 1 n2: last error: engine missing") != std::string::npos);
  CHECK(text.find("job 42 (runtime rt-a): running, DEGRADED: 1/2 ranks ready, 1 degraded, 0 unresponsive") !=
        std::string::npos);
}

TEST_CASE("status shows a GPU runtime's GPUs per rank and which slot holds which") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 5);
  auto r = report_of(1, State::ready, 2, "n2");
  set_gpus(r, {{"0", "1"}, {"GPU-5e1f"}});
  t.update(r);
  auto doc = json::parse(t.to_json());
  CHECK(doc["ranks"][0]["gpus"] == json::array());  // a CPU runtime
  CHECK(doc["ranks"][1]["gpus"] == json{{"0", "1"}, {"GPU-5e1f"}});
  auto v = parse_status(doc.dump(), "s");
  CHECK(v.ranks[1].gpus == std::vector<std::vector<std::string>>{{"0", "1"}, {"GPU-5e1f"}});
  auto text = render(v, assess(v, fc.wall + 1));
  CHECK(text.find("rank 1 n2: GPUs: slot 0: 0+1, slot 1: GPU-5e1f") != std::string::npos);
  CHECK(text.find("rank 0 n1: GPUs") == std::string::npos);
  // Slots that do not fit are left out whole.
  std::vector<std::vector<std::string>> many(40, std::vector<std::string>{"GPU-0123456789"});
  Report big;
  set_gpus(big, many);
  auto kept = gpus_of(big);
  CHECK(kept.size() == 17);  // 17 x 14 + 16 separators = 254 bytes
  CHECK(kept.back() == std::vector<std::string>{"GPU-0123456789"});
  // An older file without the key reads as a CPU runtime.
  doc["ranks"][1].erase("gpus");
  CHECK(parse_status(doc.dump(), "s").ranks[1].gpus.empty());
}

TEST_CASE("status shows a GPU slot taken out of service, with why") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 5);
  auto r = report_of(1, State::ready, 2, "n2");
  set_gpus(r, {{"0"}, {"1"}, {"2"}});
  set_gpus_out(r, {{1, "died 2 times within 60 s (deploy.restart_limit = 1); last: killed by signal 11"}, {70, "x"}});
  t.update(r);
  auto doc = json::parse(t.to_json());
  CHECK(doc["ranks"][0]["gpus_out"] == json::array());
  CHECK(doc["ranks"][1]["gpus_out"] == json{1});
  CHECK(doc["ranks"][1]["gpus_out_why"] ==
        "slot 1: died 2 times within 60 s (deploy.restart_limit = 1); last: killed by signal 11");
  auto v = parse_status(doc.dump(), "s");
  CHECK(v.ranks[1].gpus_out == std::vector<int>{1});
  auto text = render(v, assess(v, fc.wall + 1));
  CHECK(text.find("rank 1 n2: GPUs: slot 0: 0, slot 1: 1 (out of service), slot 2: 2") != std::string::npos);
  CHECK(text.find("rank 1 n2: GPUs out of service: slot 1: died 2 times within 60 s") != std::string::npos);
  // An older file without the keys has every slot in service.
  doc["ranks"][1].erase("gpus_out");
  CHECK(parse_status(doc.dump(), "s").ranks[1].gpus_out.empty());
  doc["ranks"][1]["gpus_out"] = json{"1"};
  CHECK_THROWS_AS(parse_status(doc.dump(), "s"), Error);
}

TEST_CASE("status shows the memory nvidia-smi reported per GPU, next to the slots") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 5);
  auto r = report_of(1, State::ready, 2, "n2");
  set_gpus(r, {{"0"}, {"1", "GPU-5e1f"}});
  set_gpu_memory(r, {std::make_pair(1234, 40960), std::nullopt, std::make_pair(0, 81920)});
  t.update(r);
  auto doc = json::parse(t.to_json());
  CHECK(doc["ranks"][0]["gpu_memory"] == json::array());
  CHECK(doc["ranks"][1]["gpu_memory"] ==
        json::parse(
            R"([{"gpu":"0","used_mib":1234,"total_mib":40960},{"gpu":"GPU-5e1f","used_mib":0,"total_mib":81920}])"));
  auto v = parse_status(doc.dump(), "s");
  REQUIRE(v.ranks[1].gpu_memory.size() == 2);
  CHECK(v.ranks[1].gpu_memory[1].total_mib == 81920);
  auto text = render(v, assess(v, fc.wall + 1));
  CHECK(text.find("rank 1 n2: GPU memory used: 0: 1234/40960 MiB, GPU-5e1f: 0/81920 MiB") != std::string::npos);
  // No figure at all is no text.
  Report none;
  set_gpu_memory(none, {std::nullopt});
  CHECK(gpu_memory_of(none).empty());
}

TEST_CASE("a rank that consumes nothing or is blocked by the broker says so, and is not ready") {
  FakeClock fc;
  Table t = ready_table(fc, 2, 5);
  auto deaf = report_of(0, State::reconnecting, 2, "n1");
  deaf.consuming = 0;
  t.update(deaf);
  auto blocked = report_of(1, State::ready, 2, "n2");
  blocked.broker_blocked = 1;
  t.update(blocked);
  auto v = parse_status(t.to_json(), "s");
  CHECK(v.ranks[0].state == State::reconnecting);
  CHECK(!v.ranks[0].consuming);
  CHECK(v.ranks[1].blocked);
  auto text = render(v, assess(v, fc.wall + 1));
  CHECK(text.find("n1    reconnecting  1/4    10    1       2         no consumer") != std::string::npos);
  CHECK(text.find("n2    ready         1/4    10    1       2         blocked") != std::string::npos);
  CHECK(text.find("DEGRADED: 1/2 ranks ready, 1 degraded") != std::string::npos);
}

TEST_CASE("a broken status file is an error naming the key") {
  CHECK_THROWS_WITH_AS(parse_status("not json", "/x/status.json"), "/x/status.json is not a JSON object", Error);
  FakeClock fc;
  Table t = ready_table(fc, 1);
  auto doc = json::parse(t.to_json());
  doc["ranks"][0].erase("broker");
  CHECK_THROWS_WITH_AS(parse_status(doc.dump(), "s"), "s: 'ranks[0].broker' is missing", Error);
  doc = json::parse(t.to_json());
  doc["version"] = 2;
  CHECK_THROWS_AS(parse_status(doc.dump(), "s"), Error);
}

TEST_CASE("the view reads states as the enums the writer uses") {
  FakeClock fc;
  Table t = ready_table(fc, 2);
  t.update(report_of(1, State::draining, 2, "n2"));
  t.set_state(DeploymentState::draining);
  auto v = parse_status(t.to_json(), "s");
  CHECK(v.state == DeploymentState::draining);
  CHECK(v.ranks[0].state == State::ready);
  CHECK(v.ranks[1].state == State::draining);
  CHECK(!ended(v.state));
  for (auto s :
       {DeploymentState::running, DeploymentState::draining, DeploymentState::stopped, DeploymentState::failed}) {
    CHECK(k_deployment_state_names.parse(k_deployment_state_names.text(s)) == s);
  }
  CHECK(ended(DeploymentState::stopped));
  CHECK(ended(DeploymentState::failed));
}

TEST_CASE("a state this version does not know is an error naming the key and the states it knows") {
  FakeClock fc;
  Table t = ready_table(fc, 1);
  auto doc = json::parse(t.to_json());
  doc["state"] = "sleeping";
  CHECK_THROWS_WITH_AS(parse_status(doc.dump(), "s"),
                       "s: 'state' is 'sleeping', not one of running, draining, stopped, failed", Error);
  doc = json::parse(t.to_json());
  doc["ranks"][0]["state"] = "Ready";
  CHECK_THROWS_WITH_AS(parse_status(doc.dump(), "s"),
                       "s: 'ranks[0].state' is 'Ready', not one of staging, starting, ready, draining, failed, "
                       "stopped, unresponsive, reconnecting",
                       Error);
}

TEST_CASE("the status file lives in the job directory, private") {
  StateDir sd;
  auto loc = locate("123");
  CHECK(loc.dir == sd.dir.str() + "/jobs/123");
  CHECK(loc.status == loc.dir + "/status.json");
  CHECK(loc.link == loc.status);
  CHECK(loc.stop == loc.dir + "/stop");
  prepare(loc);
  write_status(loc, "{}");
  struct stat st {};
  REQUIRE(::stat(loc.status.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  REQUIRE(::stat(loc.dir.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  CHECK_THROWS_AS(locate("../etc"), Error);
  CHECK_THROWS_AS(locate(""), Error);
  CHECK_THROWS_AS(locate("a/b"), Error);
  CHECK_NOTHROW(locate("12345_7"));
  CHECK_NOTHROW(locate("12345+1"));
}

TEST_CASE("a configured status file is found through a link in the job directory") {
  StateDir sd;
  TempDir elsewhere;
  auto custom = elsewhere.str() + "/sub/status-77.json";
  auto loc = locate("77", custom);
  CHECK(loc.status == custom);
  prepare(loc);
  FakeClock fc;
  Table t = ready_table(fc, 1);
  write_status(loc, t.to_json());
  auto look = find_deployment("77");
  REQUIRE(look.found);
  CHECK(look.found->text == t.to_json());
  CHECK(std::filesystem::is_symlink(loc.link));
}

TEST_CASE("a configured status file is never written through another user's link") {
  StateDir sd;
  SharedDir shared{"health"};
  TempDir victim;
  REQUIRE(as_nobody({"ln", "-s", victim.str(), shared.file("status")}));
  auto loc = locate("78", shared.file("status/status-78.json"));
  try {
    prepare(loc);
    FAIL("a status file behind another user's link was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find(shared.file("status") + " is a symbolic link of nobody") != std::string::npos);
  }
  CHECK_THROWS_AS(write_status(loc, "{}"), Error);
  CHECK_FALSE(path_exists(victim.file("status-78.json")));
}

TEST_CASE("a stop request round trip") {
  StateDir sd;
  auto loc = locate("local");
  prepare(loc);
  CHECK(!stop_requested(loc));
  request_stop(loc);
  CHECK(stop_requested(loc));
  struct stat st {};
  REQUIRE(::stat(loc.stop.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(read_file(loc.stop).find("requested_by=") == 0);
  // A new deployment with the same job id must not stop at once.
  prepare(loc);
  CHECK(!stop_requested(loc));
  request_stop(loc);
  clear_stop(loc);
  CHECK(!stop_requested(loc));
  CHECK_NOTHROW(clear_stop(loc));
}

TEST_CASE("finding a deployment: the job's, the environment's, else the newest") {
  StateDir sd;
  FakeClock fc;
  auto put = [&](const std::string& job, double updated) {
    auto loc = locate(job);
    prepare(loc);
    auto doc = json::parse(ready_table(fc, 1).to_json());
    doc["job"] = job;
    doc["updated"] = updated;
    write_status(loc, doc.dump());
  };

  auto none = find_deployment("");
  CHECK(!none.found);
  CHECK(none.looked == sd.dir.str() + "/jobs/*/status.json");
  CHECK(!find_deployment("9").found);
  CHECK(find_deployment("9").looked == sd.dir.str() + "/jobs/9/status.json");

  put("100", 1000);
  put("200", 3000);
  put("300", 2000);
  {
    auto junk = locate("400");
    prepare(junk);
    write_status(junk, "{ half a fil");
  }
  auto newest = find_deployment("");
  REQUIRE(newest.found);
  CHECK(newest.found->loc.job == "200");
  CHECK(find_deployment("100").found->loc.job == "100");
  {
    EnvGuard slurm("SLURM_JOB_ID", "300");
    auto mine = find_deployment("");
    REQUIRE(mine.found);
    CHECK(mine.found->loc.job == "300");
    EnvGuard slurm2("SLURM_JOB_ID", "555");
    auto missing = find_deployment("");
    CHECK(!missing.found);
    CHECK(missing.looked.find("jobs/555/status.json ($SLURM_JOB_ID)") != std::string::npos);
  }
  {
    EnvGuard local("LITHOPS_HPC_JOB_ID", "100");
    CHECK(find_deployment("").found->loc.job == "100");
  }
}

namespace {
// A one-rank deployment `job` in `state`, its status last updated at
// `updated`, its rank in `rank_state` (ready when not given).
void put_deployment(const std::string& job, DeploymentState state, double updated,
                    std::optional<State> rank_state = std::nullopt) {
  FakeClock fc;
  fc.wall = updated;
  Table t = ready_table(fc, 1);
  if (rank_state) {
    t.update(report_of(0, *rank_state, 9, "n1"));
  }
  t.set_state(state);
  auto doc = json::parse(t.to_json());
  doc["job"] = job;
  auto loc = locate(job);
  prepare(loc);
  write_status(loc, doc.dump());
}
}  // namespace

TEST_CASE("every deployment at a glance: ok when the live ones are ready, failure when one is not, none found") {
  StateDir sd;
  CHECK(autoalloc::overview_text(unix_now()).code == Exit::no_deployment);
  auto put = [](const std::string& job, DeploymentState state, State rank_state) {
    put_deployment(job, state, unix_now(), rank_state);
  };
  put("10", DeploymentState::running, State::ready);
  put("11", DeploymentState::failed, State::failed);  // ended: not live, not counted
  auto o = autoalloc::overview_text(unix_now());
  CHECK(o.code == Exit::ok);
  CHECK(o.text.find("job 10 (runtime rt-a): running, 1/1 ranks ready") != std::string::npos);
  CHECK(o.text.find("job 11 (runtime rt-a): failed") != std::string::npos);
  CHECK(autoalloc::live_deployments(unix_now()).size() == 1);
  put("12", DeploymentState::running, State::starting);
  CHECK(autoalloc::overview_text(unix_now()).code == Exit::failure);
  CHECK(autoalloc::overview_json(unix_now()).code == Exit::failure);
}

TEST_CASE("status lists live and recently ended deployments; --all the older ones too") {
  StateDir sd;
  double now = unix_now();
  put_deployment("20", DeploymentState::running, now);
  put_deployment("21", DeploymentState::stopped, now - 600);                              // recent
  put_deployment("22", DeploymentState::stopped, now - autoalloc::k_recent_seconds - 5);  // old
  auto o = autoalloc::overview_text(now);
  CHECK(o.text.find("job 21 (") != std::string::npos);
  CHECK(o.text.find("job 22 (") == std::string::npos);
  CHECK(o.text.find("1 deployment that ended over an hour ago not shown (status --all)") != std::string::npos);
  auto everything = autoalloc::overview_text(now, true);
  CHECK(everything.text.find("job 22 (") != std::string::npos);
  CHECK(everything.text.find("not shown") == std::string::npos);
  auto j = json::parse(autoalloc::overview_json(now).text);
  CHECK(j["deployments"].size() == 2);
  CHECK(j["hidden"] == 1);
  CHECK(json::parse(autoalloc::overview_json(now, true).text)["deployments"].size() == 3);
}

TEST_CASE("ended deployments older than keep_ended are pruned; live, recent, unreadable and the new one are kept") {
  StateDir sd;
  double now = unix_now();
  const double week = 7 * 86400;
  put_deployment("30", DeploymentState::stopped, now - week - 60);  // old, ended: removed
  put_deployment("31", DeploymentState::failed, now - 60);          // ended recently: kept
  put_deployment("32", DeploymentState::running, now);              // live: kept
  put_deployment("33", DeploymentState::running, now - week - 60);  // stale for a week: removed
  put_deployment("34", DeploymentState::stopped, now - week - 60);  // the one starting now: kept
  {
    auto junk = locate("35");
    prepare(junk);
    write_status(junk, "{ half a fil");  // unreadable: never removed blind
  }
  std::filesystem::create_directories(sd.dir.str() + "/jobs/36");  // no status at all: kept
  CHECK(prune_ended(now, week, "34") == 2);
  auto exists = [&](const std::string& job) { return std::filesystem::exists(sd.dir.str() + "/jobs/" + job); };
  CHECK(!exists("30"));
  CHECK(!exists("33"));
  for (const char* kept : {"31", "32", "34", "35", "36"}) {
    CHECK_MESSAGE(exists(kept), kept);
  }
  CHECK(prune_ended(now, week, "34") == 0);
}

TEST_CASE("a bad job id is shown bounded, its control characters escaped") {
  std::string id = "\x1b]0;x\x07" + std::string(5000, 'A');
  try {
    lhpc::health::check_job_id(id);
    FAIL("accepted");
  } catch (const lhpc::Error& e) {
    std::string what = e.what();
    CHECK(what.size() < 300);
    CHECK(what.find('\x1b') == std::string::npos);
    CHECK(what.find("\\x1b]0;x\\x07AAA") != std::string::npos);
    CHECK(what.find("(5006 bytes)") != std::string::npos);
  }
}
