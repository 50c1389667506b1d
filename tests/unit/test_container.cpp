// Container engines: exact command lines per engine and flag, how secrets
// travel (environment, never argv), the host engine, the runscript
// supervisor (restarts, backoff, give-up, stop), and instance lifecycles
// against the singularity/apptainer stand-in in tests/stand-in.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "container/engine.h"
#include "container/runscript.h"
#include "lhpc_build_config.h"
#include "lhpc_source_root.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"

using lhpc::test::EnvGuard;
using lhpc::test::TempDir;
using namespace lhpc;
using namespace lhpc::container;
using namespace std::chrono_literals;
using Argv = std::vector<std::string>;

namespace {

const std::string k_secret = "amqp://lithops:s3cr3t-pw@broker.example:5672/hpc";

// Sets (or unsets) one variable of this process for a scope.

std::string current_path() {
  const char* p = ::getenv("PATH");
  return p ? p : "/usr/bin:/bin";
}

Argv tail(Argv argv) {
  argv.erase(argv.begin());
  return argv;
}

bool argv_mentions(const Argv& argv, const std::string& needle) {
  return std::any_of(argv.begin(), argv.end(), [&](const auto& a) { return a.find(needle) != std::string::npos; });
}

template <class F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  FAIL("expected lhpc::Error");
  return Error(Exit::ok, "");
}

// The stand-in first on PATH, with its own state and invocation log.
struct StandIn {
  TempDir dir{"container"};
  EnvGuard path{"PATH", std::string(LHPC_SOURCE_ROOT) + "/tests/stand-in:" + current_path()};
  EnvGuard state{"STANDIN_STATE", dir.path + "/state"};
  EnvGuard log{"STANDIN_LOG", dir.path + "/invocations.jsonl"};
  EnvGuard build_fail{"STANDIN_BUILD_FAIL", std::nullopt};

  ~StandIn() {
    // A failed check must not leave sleepers behind.
    UniqueFd null(::open("/dev/null", O_WRONLY | O_CLOEXEC));
    run_capture({.argv = {"singularity", "instance", "stop", "--force", "--all"}, .stderr_fd = null.get()});
  }

  // A SIF built by the stand-in from a definition with this runscript.
  std::string image(const std::string& runscript = "exit 0") {
    auto def = dir.path + "/rt.def";
    std::ofstream(def) << "Bootstrap: docker\nFrom: python:3.11-slim\n\n%runscript\n    " << runscript << "\n";
    auto sif = dir.path + "/rt.sif";
    if (!path_exists(sif)) {
      auto r = run_capture({.argv = {"singularity", "build", sif, def}});
      REQUIRE(r.ok());
    }
    return sif;
  }

  std::vector<nlohmann::json> invocations() const {
    std::vector<nlohmann::json> out;
    std::ifstream in(dir.path + "/invocations.jsonl");
    for (std::string line; std::getline(in, line);) {
      out.push_back(nlohmann::json::parse(line));
    }
    return out;
  }
};

// Polls like an event loop would, at a fixed (injected) time, until the run ended.
void wait_run_ended(Runscript& rs, Runscript::Clock::time_point at) {
  for (int i = 0; i < 1000 && rs.alive(); ++i) {
    rs.poll(at);
    if (rs.alive()) {
      std::this_thread::sleep_for(5ms);
    }
  }
  REQUIRE_FALSE(rs.alive());
}

// Running, not a zombie: an orphan's new parent (PID 1 of a container) may
// never reap it.
bool process_exists(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] != 'Z' && stat[close + 2] != 'X';
}

}  // namespace

// ---------------------------------------------------------------- command lines

TEST_CASE("build: flags before OUT.sif and DEF, for each flag combination") {
  for (auto kind : {config::Engine::singularity, config::Engine::apptainer}) {
    auto e = make_engine(kind);
    CAPTURE(e->name());
    CHECK(e->build_argv("/s/rt.sif", "/d/rt.def", false, false) == Argv{e->name(), "build", "/s/rt.sif", "/d/rt.def"});
    CHECK(tail(e->build_argv("/s/rt.sif", "/d/rt.def", true, false)) ==
          Argv{"build", "--fakeroot", "/s/rt.sif", "/d/rt.def"});
    CHECK(tail(e->build_argv("/s/rt.sif", "/d/rt.def", false, true)) ==
          Argv{"build", "--force", "/s/rt.sif", "/d/rt.def"});
    CHECK(tail(e->build_argv("/s/rt.sif", "/d/rt.def", true, true)) ==
          Argv{"build", "--fakeroot", "--force", "/s/rt.sif", "/d/rt.def"});
  }
}

TEST_CASE("instance start: --fakeroot, --nv and one --bind per bind, all before SIF and NAME") {
  auto s = make_engine(config::Engine::singularity);
  auto a = make_engine(config::Engine::apptainer);
  InstanceSpec spec{.image = "/img/rt.sif", .name = "lithops-worker-42-0"};
  CHECK(s->instance_start_argv(spec) == Argv{"singularity", "instance", "start", "/img/rt.sif", "lithops-worker-42-0"});
  CHECK(a->instance_start_argv(spec) == Argv{"apptainer", "instance", "start", "/img/rt.sif", "lithops-worker-42-0"});
  spec.fakeroot = true;
  CHECK(tail(s->instance_start_argv(spec)) ==
        Argv{"instance", "start", "--fakeroot", "/img/rt.sif", "lithops-worker-42-0"});
  spec.fakeroot = false;
  spec.gpu = {"--nv", "--nvccli"};
  CHECK(tail(s->instance_start_argv(spec)) ==
        Argv{"instance", "start", "--nv", "--nvccli", "/img/rt.sif", "lithops-worker-42-0"});
  spec.gpu = {"--nv"};
  CHECK(tail(s->instance_start_argv(spec)) == Argv{"instance", "start", "--nv", "/img/rt.sif", "lithops-worker-42-0"});
  spec.fakeroot = true;
  spec.binds = {"/scratch", "/data:/mnt/data:ro"};
  Argv all{"instance", "start",  "--fakeroot",         "--nv",        "--bind",
           "/scratch", "--bind", "/data:/mnt/data:ro", "/img/rt.sif", "lithops-worker-42-0"};
  CHECK(tail(s->instance_start_argv(spec)) == all);
  CHECK(tail(a->instance_start_argv(spec)) == all);
}

TEST_CASE("instance stop, stop --timeout, stop --force, list --json, exec and run") {
  for (auto [kind, version] :
       {std::pair{config::Engine::singularity, "4.5.1"}, std::pair{config::Engine::apptainer, "1.5.3"}}) {
    auto e = make_engine(kind);
    e->set_version(version);
    auto n = e->name();
    CHECK(e->instance_stop_argv("w-1", false) == Argv{n, "instance", "stop", "w-1"});
    CHECK(e->instance_stop_argv("w-1", false, 4) == Argv{n, "instance", "stop", "--timeout", "4", "w-1"});
    CHECK(e->instance_stop_argv("w-1", true) == Argv{n, "instance", "stop", "--force", "w-1"});
    CHECK(e->instance_list_argv("w-1") == Argv{n, "instance", "list", "--json", "w-1"});
    CHECK(e->exec_argv("w-1", {"python3", "/opt/lithops-hpc/handler.py", "--slot", "3"}) ==
          Argv{n, "exec", "--no-eval", "instance://w-1", "python3", "/opt/lithops-hpc/handler.py", "--slot", "3"});
    CHECK(e->run_argv("w-1") == Argv{n, "run", "--no-eval", "instance://w-1"});
  }
}

TEST_CASE("--no-eval from Apptainer 1.1.0 and SingularityCE 3.10.0 on; older releases get no flag") {
  using config::Engine;
  CHECK(features_for(Engine::apptainer, "1.5.3").no_eval);
  CHECK(features_for(Engine::apptainer, "1.1.0-rc.1").no_eval);
  CHECK_FALSE(features_for(Engine::apptainer, "1.0.3").no_eval);
  CHECK(features_for(Engine::singularity, "4.5.1-noble").no_eval);
  CHECK(features_for(Engine::singularity, "3.10.0").no_eval);
  CHECK_FALSE(features_for(Engine::singularity, "3.9.9").no_eval);
  CHECK_FALSE(features_for(Engine::singularity, "3.8.7-1.el8").no_eval);
  // Apptainer's `singularity` compatibility link reports Apptainer's release.
  CHECK(features_for(Engine::singularity, "1.3.4").no_eval);
  CHECK_FALSE(features_for(Engine::singularity, "1.0.0").no_eval);
  CHECK_FALSE(features_for(Engine::singularity, "").no_eval);
  CHECK_FALSE(features_for(Engine::apptainer, "garbage").no_eval);

  auto old = make_engine(Engine::singularity);
  old->set_version("3.9.0");
  CHECK(old->exec_argv("w", {"python3"}) == Argv{"singularity", "exec", "instance://w", "python3"});
  CHECK(old->run_argv("w") == Argv{"singularity", "run", "instance://w"});
}

TEST_CASE("without --no-eval, \\, $ and backtick are escaped so the engine's shell gives the value back") {
  CHECK(escape_for_engine_eval("p$x$(id)`id`\\q\"") == "p\\$x\\$(id)\\`id\\`\\\\q\"");
  CHECK(escape_for_engine_eval("plain") == "plain");
  const std::string pw = "amqp://u:a$x$(id)`id`\\\"z@h/";
  auto old = make_engine(config::Engine::apptainer);
  old->set_version("1.0.3");
  CHECK(old->child_env(Env::empty(), {{"AMQP_URL", pw}}).get("APPTAINERENV_AMQP_URL") == escape_for_engine_eval(pw));
  auto now = make_engine(config::Engine::apptainer);
  now->set_version("1.5.3");
  CHECK(now->child_env(Env::empty(), {{"AMQP_URL", pw}}).get("APPTAINERENV_AMQP_URL") == pw);
}

TEST_CASE("engine commands that run nothing of ours do not carry the broker URL") {
  Env base = Env::empty();
  base.set("PATH", "/bin");
  base.set("AMQP_URL", k_secret);
  base.set("SINGULARITYENV_AMQP_URL", k_secret);
  base.set("APPTAINERENV_AMQP_URL", k_secret);
  base.set("SINGULARITYENV_OTHER", "kept");
  auto env = engine_command_env(base);
  CHECK_FALSE(env.get("AMQP_URL"));
  CHECK_FALSE(env.get("SINGULARITYENV_AMQP_URL"));
  CHECK_FALSE(env.get("APPTAINERENV_AMQP_URL"));
  CHECK(env.get("SINGULARITYENV_OTHER") == "kept");
  CHECK(env.get("PATH") == "/bin");
}

TEST_CASE("a bind path holding ',' or ':' is refused: the engines would split it") {
  auto err = error_of([] { check_bind_path("/opt/lithops,hpc/share/handler.py", "the handler bind"); });
  CHECK(err.code() == Exit::config);
  CHECK(std::string(err.what()).find("the handler bind: the path '/opt/lithops,hpc/share/handler.py' holds ','") == 0);
  CHECK(err.hint().find("ln -s") != std::string::npos);
  CHECK(error_of([] { check_bind_path("/a:b", "x"); }).code() == Exit::config);
  check_bind_path("/opt/lithops-hpc/handler.py", "x");
  auto e = make_engine(config::Engine::apptainer);
  auto start = [&](std::string bind) {
    return e->instance_start_argv({.image = "/i.sif", .name = "w", .binds = {bind}});
  };
  CHECK(error_of([&] { start("/a,b:/opt/h.py:ro"); }).code() == Exit::config);
  CHECK(error_of([&] { start("/a:b:/opt/h.py:ro"); }).code() == Exit::config);
  CHECK(start("/src:/dst:ro")[4] == "/src:/dst:ro");
}

TEST_CASE("an instance name the engine could misread is refused before anything runs") {
  auto e = make_engine(config::Engine::singularity);
  for (std::string bad : {"-rf", "a b", "w/1", "w*", ""}) {
    CAPTURE(bad);
    auto err = error_of([&] { e->instance_start_argv({.image = "/i.sif", .name = bad}); });
    CHECK(err.code() == Exit::config);
    CHECK(std::string(err.what()).find("invalid instance name") != std::string::npos);
  }
  // An image path that looks like a flag stays a path.
  CHECK(e->instance_start_argv({.image = "-odd.sif", .name = "w"})[3] == "./-odd.sif");
}

TEST_CASE("a very long instance name is checked without running out of stack") {
  // std::regex_match recursed once per character: 50,000 overflowed the stack.
  auto e = make_engine(config::Engine::singularity);
  std::string name(200000, 'a');
  CHECK(e->instance_start_argv({.image = "/i.sif", .name = name}).back() == name);
  auto err = error_of([&] { e->instance_start_argv({.image = "/i.sif", .name = name + " "}); });
  CHECK(err.code() == Exit::config);
}

// ---------------------------------------------------------------- environment

TEST_CASE("secrets reach a container through SINGULARITYENV_/APPTAINERENV_, never argv or a plain variable") {
  Env base = Env::empty();
  base.set("PATH", "/usr/bin:/bin");
  base.set("AMQP_URL", "amqp://plain-copy-from-the-user@h/");
  base.set("SINGULARITYENV_AMQP_URL", "stale");
  for (auto [kind, prefix, other] : {std::tuple{config::Engine::singularity, "SINGULARITYENV_", "APPTAINERENV_"},
                                     std::tuple{config::Engine::apptainer, "APPTAINERENV_", "SINGULARITYENV_"}}) {
    auto e = make_engine(kind);
    e->set_version(kind == config::Engine::apptainer ? "1.5.3" : "4.5.1");
    CAPTURE(e->name());
    auto env = e->child_env(base, {{"AMQP_URL", k_secret}});
    CHECK(env.get(std::string(prefix) + "AMQP_URL") == k_secret);
    CHECK_FALSE(env.get("AMQP_URL"));
    CHECK_FALSE(env.get(std::string(other) + "AMQP_URL"));
    CHECK(env.get("PATH") == "/usr/bin:/bin");
    CHECK_FALSE(argv_mentions(e->run_argv("w"), "s3cr3t"));
    CHECK_FALSE(argv_mentions(e->exec_argv("w", {"python3", "h.py"}), "s3cr3t"));
  }
}

// ---------------------------------------------------------------- host engine

TEST_CASE("host engine: commands run as they are, with variables set plainly") {
  auto h = make_engine(config::Engine::host);
  CHECK(h->name() == "host");
  CHECK(h->binary().empty());
  CHECK(h->exec_argv("w", {"python3", "handler.py"}) == Argv{"python3", "handler.py"});
  CHECK(h->instance_start_argv({.image = "/i.sif", .name = "w"}).empty());
  CHECK(h->instance_stop_argv("w", true).empty());
  CHECK(h->instance_list_argv("w").empty());
  auto env = h->child_env(Env::empty(), {{"AMQP_URL", k_secret}});
  CHECK(env.get("AMQP_URL") == k_secret);
  CHECK_FALSE(env.get("SINGULARITYENV_AMQP_URL"));

  CHECK_FALSE(h->instance_alive("w"));
  h->start_instance({.image = "/no/such.sif", .name = "w"});
  CHECK(h->instance_alive("w"));
  h->stop_instance("w", 1s);
  CHECK_FALSE(h->instance_alive("w"));
}

TEST_CASE("host engine: no image means no build and no runscript (config errors)") {
  auto h = make_engine(config::Engine::host);
  auto b = error_of([&] { h->build_argv("/o.sif", "/d.def", false, false); });
  CHECK(b.code() == Exit::config);
  auto r = error_of([&] { h->run_argv("w"); });
  CHECK(r.code() == Exit::config);
  CHECK(std::string(r.what()).find("runscript mode needs a container image") != std::string::npos);
  CHECK_THROWS_AS(Runscript(*h, "w", {{"AMQP_URL", k_secret}}), Error);
}

TEST_CASE("a missing engine says what to load or configure instead") {
  TempDir empty;
  EnvGuard path("PATH", empty.path);
  auto s = make_engine(config::Engine::singularity);
  auto err = error_of([&] { s->binary(); });
  CHECK(err.code() == Exit::engine);
  CHECK(std::string(err.what()) == "singularity not found in PATH");
  CHECK(err.hint() == "load it (module load singularity) or set singularity.engine = \"apptainer\" / \"host\"");
  auto a = make_engine(config::Engine::apptainer);
  CHECK(error_of([&] { a->binary(); }).hint().find("module load apptainer") != std::string::npos);
  CHECK(error_of([&] { s->start_instance({.image = "/i.sif", .name = "w"}); }).code() == Exit::engine);
}

// ---------------------------------------------------------------- runscript supervisor

TEST_CASE("runscript: the engine command carries the secret only in its environment") {
  EnvGuard plain("AMQP_URL", std::string("amqp://plain@h/"));
  auto e = make_engine(config::Engine::apptainer);
  e->set_version("1.5.3");
  Runscript rs(*e, "w-7", {{"AMQP_URL", k_secret}});
  CHECK(rs.argv() == Argv{"apptainer", "run", "--no-eval", "instance://w-7"});
  CHECK(rs.env().get("APPTAINERENV_AMQP_URL") == k_secret);
  CHECK_FALSE(rs.env().get("AMQP_URL"));
}

TEST_CASE("runscript: a dying run is restarted after 1 s, 2 s, 4 s, then given up") {
  Runscript rs({"sh", "-c", "exit 3"}, Env::current(), {.restart_limit = 2});
  auto t = Runscript::Clock::now();
  rs.start(t);
  CHECK(rs.restarts() == 0);
  wait_run_ended(rs, t);
  CHECK(rs.consecutive_failures() == 1);
  CHECK(rs.last_error().find("exited with code 3") != std::string::npos);
  REQUIRE(rs.next_wakeup());
  CHECK(*rs.next_wakeup() == t + 1s);

  rs.poll(t + 999ms);  // not yet due: poll never waits for it
  CHECK(rs.restarts() == 0);
  rs.poll(t + 1s);
  CHECK(rs.restarts() == 1);
  wait_run_ended(rs, t + 1s);
  CHECK(*rs.next_wakeup() == t + 1s + 2s);

  rs.poll(t + 3s);
  CHECK(rs.restarts() == 2);
  wait_run_ended(rs, t + 3s);
  CHECK(rs.failed());
  CHECK_FALSE(rs.next_wakeup());
  CHECK(rs.consecutive_failures() == 3);
  rs.poll(t + 1h);
  CHECK(rs.restarts() == 2);  // failed is final
}

TEST_CASE("runscript: the backoff doubles up to 30 s and stays there") {
  Runscript rs({"sh", "-c", "exit 1"}, Env::current(), {.restart_limit = 10});
  auto t = Runscript::Clock::now();
  rs.start(t);
  std::vector<long> delays;
  for (int i = 0; i < 7; ++i) {
    wait_run_ended(rs, t);
    REQUIRE(rs.next_wakeup());
    delays.push_back(std::chrono::duration_cast<std::chrono::seconds>(*rs.next_wakeup() - t).count());
    t = *rs.next_wakeup();
    rs.poll(t);
  }
  CHECK(delays == std::vector<long>{1, 2, 4, 8, 16, 30, 30});
  CHECK_FALSE(rs.failed());
}

TEST_CASE("runscript: a run that stayed up for the window ends the failure streak") {
  Runscript rs({"sh", "-c", "exit 1"}, Env::current(), {.restart_limit = 1, .window = 60s});
  auto t = Runscript::Clock::now();
  rs.start(t);
  wait_run_ended(rs, t + 5s);
  CHECK(rs.consecutive_failures() == 1);
  rs.poll(t + 6s);
  // This run "lasted" 2 minutes: healthy, so its death starts a new streak
  // (backoff from 1 s again) instead of being the final failure.
  wait_run_ended(rs, t + 6s + 120s);
  CHECK_FALSE(rs.failed());
  CHECK(rs.consecutive_failures() == 1);
  CHECK(*rs.next_wakeup() == t + 6s + 120s + 1s);
}

TEST_CASE("runscript: a command that cannot start counts as a failed run") {
  Runscript rs({"/nonexistent/lhpc-runscript"}, Env::current(), {.restart_limit = 0});
  rs.start();
  CHECK(rs.failed());
  CHECK(rs.last_error().find("cannot start the runscript") != std::string::npos);
}

TEST_CASE("runscript: stop() signals the whole process group and does not restart") {
  TempDir d{"container"};
  auto pidfile = d.path + "/grandchild.pid";
  Runscript rs({"sh", "-c", "sleep 60 & echo $! > " + pidfile + "; wait"}, Env::current());
  rs.start();
  pid_t grandchild = 0;
  for (int i = 0; i < 400 && grandchild == 0; ++i) {
    std::ifstream in(pidfile);
    in >> grandchild;
    std::this_thread::sleep_for(5ms);
  }
  REQUIRE(grandchild > 0);
  CHECK(rs.alive());
  rs.stop(2s);
  CHECK_FALSE(rs.alive());
  CHECK(rs.stopped());
  for (int i = 0; i < 200 && process_exists(grandchild); ++i) {
    std::this_thread::sleep_for(5ms);
  }
  CHECK_FALSE(process_exists(grandchild));
  rs.poll(Runscript::Clock::now() + 1h);
  CHECK(rs.restarts() == 0);
}

TEST_CASE("runscript: a run that ignores SIGTERM is killed after the grace period") {
  TempDir d{"container"};
  auto ready = d.path + "/ready";
  Runscript rs({"sh", "-c", "trap '' TERM; touch " + ready + "; while :; do sleep 0.05; done"}, Env::current());
  rs.start();
  for (int i = 0; i < 400 && !path_exists(ready); ++i) {
    std::this_thread::sleep_for(5ms);
  }
  REQUIRE(path_exists(ready));
  auto t0 = std::chrono::steady_clock::now();
  rs.stop(300ms);
  CHECK(std::chrono::steady_clock::now() - t0 >= 300ms);
  CHECK_FALSE(rs.alive());
}

// ---------------------------------------------------------------- against the stand-in

TEST_CASE("stand-in: start, alive, stop an instance") {
  StandIn si;
  auto sif = si.image();
  for (auto kind : {config::Engine::singularity, config::Engine::apptainer}) {
    auto e = make_engine(kind);
    CAPTURE(e->name());
    std::string name = "lithops-worker-" + e->name() + "-0";
    CHECK_FALSE(e->instance_alive(name));
    e->start_instance({.image = sif, .name = name, .fakeroot = true, .binds = {si.dir.path}});
    CHECK(e->instance_alive(name));
    CHECK_FALSE(e->instance_alive(name.substr(0, name.size() - 2)));  // a prefix is another name
    e->stop_instance(name, 5s);
    CHECK_FALSE(e->instance_alive(name));
    e->stop_instance(name, 1s);  // already gone: nothing to do
  }
  auto log = si.invocations();
  auto started = std::find_if(log.begin(), log.end(), [](const auto& j) { return j["argv"][1] == "start"; });
  REQUIRE(started != log.end());
  CHECK((*started)["argv"] == nlohmann::json(Argv{"instance", "start", "--fakeroot", "--bind", si.dir.path, sif,
                                                  "lithops-worker-singularity-0"}));
}

TEST_CASE("stand-in: an instance whose process died is not alive") {
  StandIn si;
  auto e = make_engine(config::Engine::singularity);
  e->start_instance({.image = si.image(), .name = "w-dies"});
  auto r = run_capture({.argv = {"singularity", "instance", "list", "--json", "w-dies"}});
  auto pid = nlohmann::json::parse(r.out)["instances"][0]["pid"].get<pid_t>();
  ::kill(pid, SIGKILL);
  bool alive = true;
  for (int i = 0; i < 100 && alive; ++i) {
    alive = e->instance_alive("w-dies");
    std::this_thread::sleep_for(20ms);
  }
  CHECK_FALSE(alive);
}

TEST_CASE("stand-in: a failing start reports the engine's stderr tail") {
  StandIn si;
  auto e = make_engine(config::Engine::apptainer);
  auto err = error_of([&] { e->start_instance({.image = si.dir.path + "/missing.sif", .name = "w-x"}); });
  CHECK(err.code() == Exit::engine);
  std::string what = err.what();
  CHECK(what.find("apptainer instance start failed for w-x (exited with code 255)") != std::string::npos);
  CHECK(what.find("could not open image") != std::string::npos);
  CHECK(err.hint().find("apptainer instance start") != std::string::npos);

  e->start_instance({.image = si.image(), .name = "w-twice"});
  auto again = error_of([&] { e->start_instance({.image = si.image(), .name = "w-twice"}); });
  CHECK(std::string(again.what()).find("already exists") != std::string::npos);
  e->stop_instance("w-twice", 5s);
}

TEST_CASE("stand-in: the runscript sees AMQP_URL unchanged, argv and the engine's environment never hold it") {
  StandIn si;
  auto out = si.dir.path + "/seen";
  auto sif = si.image("printf 'url=%s\\n' \"$AMQP_URL\" > \"$LHPC_TEST_OUT\"");
  EnvGuard plain("AMQP_URL", std::string("amqp://plain-user-copy@h/"));
  // What the engines' shell would evaluate without --no-eval.
  const std::string secret = "amqp://lithops:s3cr3t-$x-$(id)-`id`-\\-\"@broker.example:5672/hpc";
  // Releases with --no-eval, and ones before it (escaping instead).
  using config::Engine;
  for (auto [kind, version] : {std::pair{Engine::singularity, ""}, std::pair{Engine::apptainer, ""},
                               std::pair{Engine::singularity, "3.9.0"}, std::pair{Engine::apptainer, "1.0.3"}}) {
    EnvGuard v("STANDIN_VERSION", *version ? std::optional<std::string>(version) : std::nullopt);
    {
      auto e = make_engine(kind);
      CAPTURE(e->name());
      CAPTURE(version);
      ::unlink(out.c_str());
      std::string name = "w-run-" + e->name();
      e->start_instance({.image = sif, .name = name});
      Runscript rs(*e, name, {{"AMQP_URL", secret}, {"LHPC_TEST_OUT", out}});
      CHECK(argv_mentions(rs.argv(), "--no-eval") == (*version == '\0'));
      auto t = Runscript::Clock::now();
      rs.start(t);
      wait_run_ended(rs, t);
      CHECK(read_file(out) == "url=" + secret + "\n");
      e->stop_instance(name, 5s);
    }
  }
  std::string prefix = "SINGULARITYENV_";
  for (const auto& j : si.invocations()) {
    CHECK(j.dump().find("s3cr3t") == std::string::npos);  // argv, env names, cwd
    auto names = j["env"].get<std::vector<std::string>>();
    if (j["argv"][0] == "instance") {
      // instance start/list/stop run nothing that needs the broker.
      CHECK(std::none_of(names.begin(), names.end(),
                         [](const auto& n) { return n.find("AMQP_URL") != std::string::npos; }));
    }
    if (j["argv"][0] == "run") {
      auto want = (j["prog"] == "apptainer" ? "APPTAINERENV_" : prefix) + "AMQP_URL";
      CHECK(std::find(names.begin(), names.end(), want) != names.end());
    }
  }
}

TEST_CASE("stand-in: instance stop asks the engine to kill after fewer seconds than our own deadline") {
  StandIn si;
  auto e = make_engine(config::Engine::apptainer);
  e->start_instance({.image = si.image(), .name = "w-stop"});
  e->stop_instance("w-stop", 5s);
  CHECK_FALSE(e->instance_alive("w-stop"));
  std::vector<nlohmann::json> stops;
  for (const auto& j : si.invocations()) {
    if (j["argv"][0] == "instance" && j["argv"][1] == "stop") {
      stops.push_back(j["argv"]);
    }
  }
  REQUIRE(stops.size() == 1);  // no --force fallback needed
  CHECK(stops[0] == nlohmann::json(Argv{"instance", "stop", "--timeout", "2", "w-stop"}));
}

TEST_CASE("stand-in: SingularityCE in OCI mode gets --no-oci on start and exec, and is stopped by its PID") {
  StandIn si;
  EnvGuard oci("STANDIN_OCI_MODE", std::string("1"));
  auto e = make_engine(config::Engine::singularity);
  e->start_instance({.image = si.image(), .name = "w-oci"});
  CHECK(e->instance_alive("w-oci"));
  CHECK(e->features().no_oci);
  CHECK(e->exec_argv("w-oci", {"true"}) ==
        Argv{"singularity", "exec", "--no-oci", "--no-eval", "instance://w-oci", "true"});
  auto r = run_capture({.argv = e->exec_argv("w-oci", {"true"})});
  CHECK(r.ok());
  e->stop_instance("w-oci", 4s);
  CHECK_FALSE(e->instance_alive("w-oci"));
}

// ---------------------------------------------------------------- bundled definitions

TEST_CASE("the bundled runtime definitions are found from a build tree") {
  auto dir = find_runtime_defs_dir();
  CHECK(path_exists(dir + "/lithops-default.def"));
  CHECK(path_exists(dir + "/handler.py"));
}
