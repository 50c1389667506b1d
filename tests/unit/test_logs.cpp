// Handler logs: the size cap and its one rotation, no symlink followed, the
// capture thread (pipe to file, tail, sync), where logs live (logs.dir), the
// record `lithops-hpc logs` reads, and the reader's rank prefix across a
// rotation. Rank 0's progress line (health/progress) is tested here too: it
// is the other half of a readable job output.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sstream>
#include <string>

#include "health/progress.h"
#include "logs/capture.h"
#include "logs/place.h"
#include "logs/reader.h"
#include "logs/rotating_file.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"

using lhpc::test::EnvGuard;
using lhpc::test::TempDir;
using namespace lhpc;
using namespace lhpc::logs;

namespace {

UniqueFd open_d(const std::string& path) { return UniqueFd(::open(path.c_str(), O_RDONLY | O_DIRECTORY)); }

std::string slurp(const std::string& path) { return path_exists(path) ? read_file(path) : std::string(); }

std::string line(int i) { return "line " + std::to_string(i) + " " + std::string(20, 'x') + "\n"; }

}  // namespace

TEST_CASE("a rank's log never exceeds its cap and keeps one rotated file") {
  TempDir t("logs");
  auto dir = open_d(t.path);
  RotatingFile f(dir.get(), "rank-0.log", t.file("rank-0.log"), 100);
  std::string all;
  for (int i = 0; i < 20; ++i) {
    CHECK(f.append(line(i)));
    all += line(i);
  }
  auto cur = slurp(t.file("rank-0.log"));
  auto old = slurp(t.file("rank-0.log.1"));
  CHECK(cur.size() <= 100);
  CHECK(old.size() <= 100);
  CHECK(f.rotations() >= 2);
  CHECK_FALSE(path_exists(t.file("rank-0.log.2")));
  // Whole lines only, and the newest ones: .1 then the current file end the stream.
  CHECK(all.size() >= (old + cur).size());
  CHECK(all.substr(all.size() - (old + cur).size()) == old + cur);
  CHECK(cur.back() == '\n');
}

TEST_CASE("a line longer than the cap is cut to it") {
  TempDir t("logs");
  auto dir = open_d(t.path);
  RotatingFile f(dir.get(), "r.log", t.file("r.log"), 50);
  f.append(std::string(500, 'y') + "\nshort\n");
  CHECK(slurp(t.file("r.log.1")) == std::string(49, 'y') + "\n");
  CHECK(slurp(t.file("r.log")) == "short\n");
}

TEST_CASE("a log file reopened appends and counts what is there") {
  TempDir t("logs");
  auto dir = open_d(t.path);
  {
    RotatingFile f(dir.get(), "r.log", t.file("r.log"), 1000);
    f.append("one\n");
  }
  RotatingFile g(dir.get(), "r.log", t.file("r.log"), 1000);
  CHECK(g.size() == 4);
  g.append("two\n");
  CHECK(slurp(t.file("r.log")) == "one\ntwo\n");
}

TEST_CASE("a symlink at the log path is refused, for writing and for reading") {
  TempDir t("logs");
  auto target = t.write("elsewhere", "");
  REQUIRE(::symlink(target.c_str(), t.file("rank-0.log").c_str()) == 0);
  auto dir = open_d(t.path);
  CHECK_THROWS_WITH_AS(RotatingFile(dir.get(), "rank-0.log", t.file("rank-0.log"), 100),
                       doctest::Contains("symbolic link"), Error);
  CHECK_THROWS_WITH_AS(open_log_for_reading(dir.get(), "rank-0.log", t.file("rank-0.log")),
                       doctest::Contains("symbolic link"), Error);
  CHECK(slurp(target).empty());
}

TEST_CASE("what handlers write to the pipe lands in the file, whole lines, with a tail") {
  TempDir t("logs");
  Capture c(open_d(t.path), "rank-1.log", t.file("rank-1.log"), 1 << 20);
  std::string text = "first\nsecond without newline yet";
  REQUIRE(::write(c.write_fd(), text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  c.sync();
  CHECK(slurp(t.file("rank-1.log")) == "first\n");
  REQUIRE(::write(c.write_fd(), "\n", 1) == 1);
  c.sync();
  CHECK(slurp(t.file("rank-1.log")) == "first\nsecond without newline yet\n");
  auto tail = c.tail();
  REQUIRE(tail.size() == 2);
  CHECK(tail[1] == "second without newline yet");
  REQUIRE(::write(c.write_fd(), "partial", 7) == 7);
  c.close();
  CHECK(slurp(t.file("rank-1.log")) == "first\nsecond without newline yet\npartial\n");
}

TEST_CASE("where logs live: node-local, the job's state directory, or a path") {
  TempDir t("logs");
  EnvGuard state("LITHOPS_HPC_STATE_DIR", t.file("state").c_str());
  auto node = place_for("node", "123");
  CHECK(node.dir == "/tmp/lithops-hpc-" + std::to_string(::geteuid()) + "/123");
  CHECK(place_for("state", "123").dir == t.file("state") + "/jobs/123/logs");
  auto path = place_for(t.file("mine"), "123");
  CHECK(path.dir == t.file("mine") + "/123");
  auto fd = open_dir(path, true);
  REQUIRE(fd);
  struct stat st {};
  REQUIRE(::stat(path.dir.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  CHECK_FALSE(open_dir(place_for(t.file("mine"), "other"), false));
  CHECK_THROWS_AS(place_for("node", "../x"), Error);
}

TEST_CASE("an existing logs.dir PATH keeps its mode; what lithops-hpc makes is 0700") {
  TempDir t("logs");
  auto mode_of = [](const std::string& p) {
    struct stat st {};
    REQUIRE(::stat(p.c_str(), &st) == 0);
    return st.st_mode & 07777;
  };
  auto group_share = t.file("project-logs");
  REQUIRE(::mkdir(group_share.c_str(), 0750) == 0);
  ::chmod(group_share.c_str(), 02750);
  REQUIRE(open_dir(place_for(group_share, "5"), true));
  CHECK(mode_of(group_share) == 02750);
  CHECK((mode_of(group_share + "/5") & 0777) == 0700);  // setgid, as the directory passes it on
  auto fresh = t.file("fresh");
  REQUIRE(open_dir(place_for(fresh, "5"), true));
  CHECK(mode_of(fresh) == 0700);
  auto open_to_all = t.file("open");
  REQUIRE(::mkdir(open_to_all.c_str(), 0700) == 0);
  ::chmod(open_to_all.c_str(), 0777);
  CHECK_THROWS_WITH_AS(open_dir(place_for(open_to_all, "5"), true), doctest::Contains("writable by other users"),
                       Error);
}

TEST_CASE("a planted symlink on the way to the log directory is not followed") {
  lhpc::test::SharedDir t("logs");
  REQUIRE(::mkdir(t.file("real").c_str(), 0700) == 0);
  REQUIRE(lhpc::test::as_nobody({"ln", "-s", t.file("real"), t.file("base")}));
  CHECK_THROWS_WITH_AS(open_dir(place_for(t.file("base"), "9"), true), doctest::Contains("symbolic link"), Error);
  CHECK_FALSE(path_exists(t.file("real") + "/9"));
}

TEST_CASE("the reader prefixes each line with its rank and follows a rotation") {
  TempDir t("logs");
  EnvGuard state("LITHOPS_HPC_STATE_DIR", t.file("state").c_str());
  auto place = place_for(t.file("logs"), "j1");
  auto dir = open_dir(place, true);
  write_record({.job = "j1", .where = place.where, .dir = place.dir, .max_bytes = 64, .nodes = {"n1", "n2", "n3"}});
  auto rec = read_record("j1");
  REQUIRE(rec);
  CHECK(rec->nodes.size() == 3);
  RotatingFile f0(dir.get(), file_name(0), "r0", 64);
  f0.append("a\n");
  RotatingFile f2(dir.get(), file_name(2), "r2", 64);
  f2.append("c\n");
  Reader all(*rec, std::nullopt);
  std::ostringstream out;
  all.pump(out);
  CHECK(out.str() == "rank 0: a\nrank 2: c\n");
  CHECK(all.missing() == std::vector<int>{1});
  // Past the cap the file is renamed to .1: the reader finishes it, then reads the new one.
  f0.append(std::string(40, 'b') + "\n" + std::string(40, 'd') + "\n");
  out.str("");
  all.pump(out);
  CHECK(out.str() == "rank 0: " + std::string(40, 'b') + "\nrank 0: " + std::string(40, 'd') + "\n");
  CHECK_THROWS_WITH_AS(Reader(*rec, 3), doctest::Contains("no rank 3"), Error);
  CHECK_FALSE(read_record("nope"));
}

TEST_CASE("the progress line: tasks, rate, slots, ranks, on one line") {
  health::Summary s;
  s.ranks = 3;
  s.ready = 3;
  s.slots_busy = 12;
  s.slots_total = 16;
  s.done = 1234;
  s.failed = 2;
  CHECK(health::progress_line(s, 3.25, "rt-a") ==
        "progress: tasks 1234 done, 2 failed, 3.2/s; slots 12/16 busy; ranks 3/3 ready; runtime rt-a");
  CHECK(health::progress_line(s, 3.25).ends_with("ranks 3/3 ready; every runtime"));
  s.unresponsive = 1;
  s.ready = 2;
  CHECK(health::progress_line(s, 0).find("ranks 2/3 ready, 1 unresponsive") != std::string::npos);
}

TEST_CASE("progress lines come every interval, the rate from what finished in it") {
  health::Progress p(60, 1000);
  health::Summary s;
  s.done = 100;
  CHECK_FALSE(p.due(s, 1059));
  auto first = p.due(s, 1060);
  REQUIRE(first);
  CHECK(first->find("1.7/s") != std::string::npos);
  s.done = 130;
  s.failed = 20;
  auto second = p.due(s, 1120);
  REQUIRE(second);
  CHECK(second->find("tasks 130 done, 20 failed, 0.8/s") != std::string::npos);
  s.done = 0;  // a rank's counters went back (it restarted): no negative rate
  s.failed = 0;
  CHECK(p.due(s, 1180)->find(" 0.0/s") != std::string::npos);
  health::Progress off(0, 0);
  CHECK_FALSE(off.due(s, 1e9));
}
