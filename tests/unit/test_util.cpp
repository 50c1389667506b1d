// Shared helpers: processes (environment, exit status), private directories, atomic writes.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "test_support.h"
#include "util/backoff.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/json_number.h"
#include "util/memory_limit.h"
#include "util/process.h"
#include "util/signals.h"
#include "util/strings.h"

using namespace lhpc;
using lhpc::test::as_nobody;
using lhpc::test::SharedDir;
using lhpc::test::TempDir;

TEST_CASE("a child gets exactly the environment we give it") {
  Env env = Env::empty();
  env.set("PATH", "/usr/bin:/bin");
  env.set("LHPC_X", "42");
  auto r = run_capture({.argv = {"sh", "-c", "echo $LHPC_X; env | wc -l"}, .env = env});
  CHECK(r.ok());
  CHECK(r.out.substr(0, 3) == "42\n");
}

TEST_CASE("exit status is described and mapped like a shell") {
  auto r = run_capture({.argv = {"sh", "-c", "exit 3"}});
  CHECK(r.exit_code() == 3);
  CHECK(describe_status(r.status) == "exited with code 3");
  auto k = run_capture({.argv = {"sh", "-c", "kill -9 $$"}});
  CHECK(k.exit_code() == 137);
  CHECK(describe_status(k.status).find("signal 9") != std::string::npos);
}

TEST_CASE("a missing program is a clear error") { CHECK_THROWS_AS(spawn({.argv = {"no-such-program-lhpc"}}), Error); }

TEST_CASE("a child handle that goes away kills its process") {
  pid_t pid;
  {
    auto c = spawn({.argv = {"sleep", "30"}});
    pid = c.pid();
    CHECK(::kill(pid, 0) == 0);
  }
  CHECK(::kill(pid, 0) != 0);
}

TEST_CASE("private directories are 0700 and refuse symlinks") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  auto p = d + "/a/b/private";
  make_private_dir(p);
  struct stat st {};
  REQUIRE(::stat(p.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  ::chmod(p.c_str(), 0755);
  make_private_dir(p);
  ::stat(p.c_str(), &st);
  CHECK((st.st_mode & 0777) == 0700);
  ::symlink("/tmp", (d + "/link").c_str());
  CHECK_THROWS_AS(make_private_dir(d + "/link"), Error);
  std::filesystem::remove_all(d);
}

TEST_CASE("atomic writes replace the file with the promised mode") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  auto f = d + "/status.json";
  write_file_atomic(f, "one", 0600);
  write_file_atomic(f, "two", 0600);
  CHECK(read_file(f) == "two");
  struct stat st {};
  ::stat(f.c_str(), &st);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(std::distance(std::filesystem::directory_iterator(d), {}) == 1);
  std::filesystem::remove_all(d);
}

// The attacker's side of these tests is played by uid 65534 (nobody): the
// suite runs as root, which can hand a directory to another user.
constexpr uid_t k_other = 65534;

TEST_CASE("an atomic write does not follow a symlink planted beside the file") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  auto victim = d + "/victim";
  { std::ofstream(victim) << "precious"; }
  auto f = d + "/status.json";
  // Every name the old code could have used: <path>.tmp.<pid>.
  REQUIRE(::symlink(victim.c_str(), (f + ".tmp." + std::to_string(::getpid())).c_str()) == 0);
  write_file_atomic(f, "new status", 0600);
  CHECK(read_file(victim) == "precious");
  CHECK(read_file(f) == "new status");
  struct stat st {};
  REQUIRE(::lstat(f.c_str(), &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  std::filesystem::remove_all(d);
}

TEST_CASE("a private directory is refused under a parent another user owns or can write") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  ::chmod(d.c_str(), 0755);
  auto theirs = d + "/theirs";
  REQUIRE(::mkdir(theirs.c_str(), 0755) == 0);
  REQUIRE(::chown(theirs.c_str(), k_other, k_other) == 0);
  try {
    make_private_dir(theirs + "/mine");
    FAIL("a directory under another user's directory was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("uid 65534") != std::string::npos);
  }
  CHECK_FALSE(path_exists(theirs + "/mine"));

  auto open_to_all = d + "/open";
  REQUIRE(::mkdir(open_to_all.c_str(), 0755) == 0);
  ::chmod(open_to_all.c_str(), 0777);
  CHECK_THROWS_AS(make_private_dir(open_to_all + "/mine"), Error);
  ::chmod(open_to_all.c_str(), 01777);  // sticky, like /tmp: others cannot swap what is ours
  make_private_dir(open_to_all + "/mine");
  CHECK(path_exists(open_to_all + "/mine"));
  std::filesystem::remove_all(d);
}

TEST_CASE("a symlink among a private directory's parents: followed when root's or ours, refused when another user's") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  REQUIRE(::mkdir((d + "/real").c_str(), 0755) == 0);
  // Ours (the suite runs as root), absolute and relative with "..": followed,
  // and the private directory lands in the real one (/home -> /gpfs/home).
  REQUIRE(::symlink((d + "/real").c_str(), (d + "/link").c_str()) == 0);
  REQUIRE(::mkdir((d + "/sub").c_str(), 0755) == 0);
  REQUIRE(::symlink("../real", (d + "/sub/up").c_str()) == 0);
  make_private_dir(d + "/link/private");
  CHECK(path_exists(d + "/real/private"));
  CHECK_NOTHROW(open_private_dir(d + "/sub/up/private", false));
  // Another user's link, even in a sticky directory they may write: refused.
  REQUIRE(::lchown((d + "/link").c_str(), k_other, k_other) == 0);
  try {
    make_private_dir(d + "/link/other");
    FAIL("a path through another user's symlink was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("symbolic link of") != std::string::npos);
    CHECK(std::string(e.what()).find("uid 65534") != std::string::npos);
  }
  CHECK_FALSE(path_exists(d + "/real/other"));
  // Ours, leading into another user's directory: the target is checked too.
  REQUIRE(::mkdir((d + "/theirs").c_str(), 0755) == 0);
  REQUIRE(::chown((d + "/theirs").c_str(), k_other, k_other) == 0);
  REQUIRE(::symlink((d + "/theirs").c_str(), (d + "/to-theirs").c_str()) == 0);
  CHECK_THROWS_AS(make_private_dir(d + "/to-theirs/private"), Error);
  CHECK_FALSE(path_exists(d + "/theirs/private"));
  // A loop ends with an error, not a hang.
  REQUIRE(::symlink((d + "/loop").c_str(), (d + "/loop").c_str()) == 0);
  CHECK_THROWS_AS(make_private_dir(d + "/loop/private"), Error);
  // The private directory itself is never a link.
  REQUIRE(::symlink((d + "/real/private").c_str(), (d + "/alias").c_str()) == 0);
  CHECK_THROWS_AS(open_private_dir(d + "/alias", false), Error);
  std::filesystem::remove_all(d);
}

TEST_CASE("a private directory someone else made is refused, naming the owner") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  auto p = d + "/private";
  REQUIRE(::mkdir(p.c_str(), 0700) == 0);
  REQUIRE(::chown(p.c_str(), k_other, k_other) == 0);
  try {
    open_private_dir(p, false);
    FAIL("another user's directory was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("uid 65534") != std::string::npos);
    CHECK_FALSE(e.hint().empty());
  }
  std::filesystem::remove_all(d);
}

TEST_CASE("mkdirs creates every missing directory with the mode asked for") {
  char tmpl[] = "/tmp/lhpc-test-util-XXXXXX";
  std::string d = ::mkdtemp(tmpl);
  auto old = ::umask(0);
  mkdirs(d + "/a/b", 0711);
  ::umask(old);
  struct stat st {};
  REQUIRE(::stat((d + "/a").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0711);
  REQUIRE(::stat((d + "/a/b").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0711);
  std::filesystem::remove_all(d);
}

TEST_CASE("missing parents are never created through another user's symlink") {
  SharedDir shared{"util"};
  TempDir ours{"util"};
  // They point a name we are about to create under at a directory of ours.
  REQUIRE(as_nobody({"ln", "-s", ours.str(), shared.file("state")}));
  try {
    make_private_dir(shared.file("state/jobs/private"));
    FAIL("a path through another user's symlink was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("symbolic link of nobody") != std::string::npos);
  }
  CHECK_FALSE(path_exists(ours.file("jobs")));
  CHECK_THROWS_AS(mkdirs(shared.file("state/a/b")), Error);
  CHECK_FALSE(path_exists(ours.file("a")));
  // Missing parents of ours, relative ones too, are still made.
  make_private_dir(shared.file("mine/jobs/private"));
  CHECK(path_exists(shared.file("mine/jobs/private")));
  lhpc::test::CwdGuard cwd(shared.str());
  mkdirs("rel/a", 0755);
  CHECK(path_exists(shared.file("rel/a")));
}

TEST_CASE("control characters are escaped for logs and terminals, printable UTF-8 is kept") {
  CHECK(escape_controls("plain id-7") == "plain id-7");
  CHECK(escape_controls("a\x1b[2Jb\x07\x7f\n") == "a\\x1b[2Jb\\x07\\x7f\\x0a");
  CHECK(escape_controls("tab\there\n", "\t") == "tab\there\\x0a");
  CHECK(escape_controls("\xc2\x9b"
                        "31m") == "\\xc2\\x9b31m");  // C1 CSI as UTF-8
  CHECK(escape_controls("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x99\x82") == "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x99\x82");
  CHECK(escape_controls("\x9b\xff\xc0\xaf\xed\xa0\x80") == "\\x9b\\xff\\xc0\\xaf\\xed\\xa0\\x80");
  CHECK(escape_controls(std::string("a\0b", 3)) == "a\\x00b");
  CHECK(escape_controls("\xe2\x82") == "\\xe2\\x82");  // cut short
}

TEST_CASE("a JSON integer field takes only an integer inside its type's range; a real field any number") {
  using J = nlohmann::json;
  CHECK(json_integer<int>(J(5)) == 5);
  CHECK_FALSE(json_integer<int>(J(1e20)));  // get<int>() of it is undefined behaviour
  CHECK_FALSE(json_integer<int>(J(5.0)));
  CHECK_FALSE(json_integer<unsigned>(J(-1)));  // get<unsigned>() wraps it
  CHECK_FALSE(json_integer<int>(J(2147483648LL)));
  CHECK(json_integer<int>(J(-2147483648LL)) == INT_MIN);
  CHECK(json_integer<std::uint64_t>(J::parse("18446744073709551615")) == UINT64_MAX);
  CHECK_FALSE(json_integer<std::int64_t>(J::parse("18446744073709551615")));
  CHECK_FALSE(json_integer<int>(J("5")));
  CHECK_FALSE(json_integer<int>(J(nullptr)));
  CHECK(json_real(J(5)) == 5.0);
  CHECK(json_real(J::parse("1e20")) == 1e20);
  CHECK_FALSE(json_real(J("1")));
  CHECK(J::parse("[1e400]", nullptr, false).is_discarded());  // no infinity gets in
  CHECK(json_integer_rule<std::uint8_t>() == "is not an integer from 0 to 255");
}

TEST_CASE("a job id that would leave its directory is refused") {
  for (const char* bad : {"", ".", "..", "../..", "a/b", "x\ny"}) {
    CHECK_THROWS_AS(check_path_component("job id", bad), Error);
  }
  CHECK_THROWS_AS(check_path_component("job id", std::string(200, '1')), Error);
  for (const char* good : {"12345", "local-77", "t1_a.b"}) {
    CHECK_NOTHROW(check_path_component("job id", good));
  }
}

TEST_CASE("string helpers") {
  CHECK(split("a,b,,c", ',').size() == 4);
  CHECK(join({"a", "b"}, ", ") == "a, b");
  CHECK(trim("  x \n") == "x");
  CHECK(shell_quote("a b") == "'a b'");
  CHECK(shell_quote("plain") == "plain");
  CHECK(human_bytes(1536) == "1.5 KiB");
  CHECK(edit_distance("sif_pth", "sif_path") == 1);
}

// --- backoff ---------------------------------------------------------------

TEST_CASE("backoff doubles from its first delay, stays at the cap, and starts over after reset") {
  Backoff b;
  std::vector<long long> got;
  for (int i = 0; i < 9; ++i) {
    got.push_back(b.next().count());
  }
  CHECK(got == std::vector<long long>{500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000});
  CHECK(b.attempts() == 9);
  b.reset();
  CHECK(b.attempts() == 0);
  CHECK(b.next().count() == 500);
  Backoff slow(std::chrono::milliseconds(1000), std::chrono::milliseconds(3000));
  CHECK(slow.next().count() == 1000);
  CHECK(slow.next().count() == 2000);
  CHECK(slow.next().count() == 3000);
  CHECK(slow.next().count() == 3000);
}

TEST_CASE("a failure window tolerates its limit and forgets failures older than the window") {
  using namespace std::chrono_literals;
  FailureWindow w(2, 10s);
  auto t0 = FailureWindow::Clock::now();
  CHECK(w.record(t0) == 1);
  CHECK(w.record(t0 + 1s) == 2);
  CHECK_FALSE(w.exceeded(t0 + 1s));
  CHECK(w.record(t0 + 2s) == 3);
  CHECK(w.exceeded(t0 + 2s));
  // The first two age out: one left, and room for more.
  CHECK(w.count(t0 + 11s) == 1);
  CHECK_FALSE(w.exceeded(t0 + 11s));
  CHECK(w.record(t0 + 30s) == 1);
}

TEST_CASE("the job's memory: cgroup limits, Slurm's allocation and MemTotal are read as MiB") {
  CHECK(parse_cgroup_limit_mb("max\n") == std::nullopt);
  CHECK(parse_cgroup_limit_mb("4294967296\n") == std::optional<std::uint64_t>(4096));
  CHECK(parse_cgroup_limit_mb("9223372036854771712\n") == std::nullopt);  // v1 without a limit
  CHECK(parse_cgroup_limit_mb("lots") == std::nullopt);
  auto v2 = parse_proc_cgroup("0::/system.slice/slurmstepd.scope/job_42/step_0\n");
  REQUIRE(v2);
  CHECK(v2->path == "/system.slice/slurmstepd.scope/job_42/step_0");
  CHECK_FALSE(v2->v1);
  auto v1 = parse_proc_cgroup("12:cpu,cpuacct:/a\n11:memory:/slurm/uid_1/job_42\n0::/b\n");
  REQUIRE(v1);
  CHECK(v1->path == "/slurm/uid_1/job_42");
  CHECK(v1->v1);
  CHECK_FALSE(parse_proc_cgroup("garbage"));
  CHECK(slurm_memory_mb("8000", nullptr, nullptr) == std::optional<std::uint64_t>(8000));
  CHECK(slurm_memory_mb(nullptr, "1000", "4") == std::optional<std::uint64_t>(4000));
  CHECK(slurm_memory_mb("", "1000", nullptr) == std::nullopt);
  CHECK(meminfo_total_mb("MemTotal:       16318480 kB\nMemFree: 1 kB\n") == std::optional<std::uint64_t>(15936));
  CHECK(meminfo_total_mb("nothing") == std::nullopt);
  CHECK(job_memory_mb() > 0);  // this machine has some
}

TEST_CASE("a run ended by a signal exits as the shell reports it: 129 SIGHUP, 130 SIGINT, 143 SIGTERM") {
  CHECK(exit_for_signal(SIGHUP) == Exit::hangup);
  CHECK(exit_for_signal(SIGINT) == Exit::interrupted);
  CHECK(exit_for_signal(SIGTERM) == Exit::terminated);
  CHECK(static_cast<int>(Exit::hangup) == 128 + SIGHUP);
  CHECK(static_cast<int>(Exit::interrupted) == 128 + SIGINT);
  CHECK(static_cast<int>(Exit::terminated) == 128 + SIGTERM);
}

namespace {

// A spawned child runs `word` once it has exec'ed (before, it is a copy of
// us; setpriv execs once it has changed user): wait for that.
bool runs(pid_t pid, const std::string& word) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  auto now_runs = [&] {
    try {
      return read_file("/proc/" + std::to_string(pid) + "/cmdline").rfind(word, 0) == 0;
    } catch (const Error&) {
      return false;
    }
  };
  while (!now_runs() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return now_runs();
}

}  // namespace

TEST_CASE("a pid names our process only while it runs as us with the expected command") {
  SpawnOptions mine;
  mine.argv = {"sleep", "30"};
  auto c = spawn(mine);
  REQUIRE(runs(c.pid(), "sleep"));
  CHECK(own_process_with(c.pid(), "sleep"));
  CHECK_FALSE(own_process_with(c.pid(), "redis-server"));
  CHECK_FALSE(own_process_with(0, "sleep"));
  CHECK_FALSE(own_process_with(-1, "sleep"));

  SpawnOptions theirs;
  theirs.argv = {"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", "30"};
  auto t = spawn(theirs);
  REQUIRE(runs(t.pid(), "sleep"));
  CHECK_FALSE(own_process_with(t.pid(), "sleep"));
}

TEST_CASE("a pid file holds one positive number; anything else is no pid") {
  lhpc::test::TempDir d("util");
  CHECK_FALSE(read_pid_file(d.file("missing.pid"), "the pid file"));
  CHECK(read_pid_file(d.write("a.pid", "1234\n"), "the pid file") == 1234);
  CHECK_FALSE(read_pid_file(d.write("b.pid", "x"), "the pid file"));
  CHECK_FALSE(read_pid_file(d.write("c.pid", "-5"), "the pid file"));
  CHECK_FALSE(read_pid_file(d.write("d.pid", "99999999999"), "the pid file"));
}

TEST_CASE("text for a log is bounded on a character boundary, marked with its size, controls escaped") {
  CHECK(bounded_for_log("short\x1b[2J", 512) == "short\\x1b[2J");
  CHECK(bounded_for_log(std::string(600, 'x'), 512) == std::string(512, 'x') + "... (600 bytes)");
  // "é" is two bytes: a cut inside it goes back to its start.
  CHECK(bounded_for_log("ab\xc3\xa9z", 3) == "ab... (5 bytes)");
  CHECK(bounded_for_log("ab\xc3\xa9z", 4) == "ab\xc3\xa9... (5 bytes)");
}
