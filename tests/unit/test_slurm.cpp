// Slurm facts: hostlist syntax, the job as seen from its environment, and
// that a missing or broken Slurm never takes the caller down. The "live" case
// runs only inside a job of the test rig (tests/integration/test_slurm_e2e.py
// runs this binary with srun and LHPC_TEST_SLURM_LIVE=1).
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "lhpc_build_config.h"
#include "slurm/job.h"

#if LHPC_HAVE_SLURM
#include <slurm/slurm.h>
#endif

using namespace lhpc;
using Hosts = std::vector<std::string>;

namespace {

// Sets variables for one test case and restores the previous values after it.
class ScopedEnv {
public:
  ScopedEnv& set(const std::string& k, const std::optional<std::string>& v) {
    if (!m_saved.count(k)) {
      const char* old = std::getenv(k.c_str());
      m_saved[k] = old ? std::optional<std::string>(old) : std::nullopt;
    }
    if (v) {
      ::setenv(k.c_str(), v->c_str(), 1);
    } else {
      ::unsetenv(k.c_str());
    }
    return *this;
  }
  ~ScopedEnv() {
    for (const auto& [k, v] : m_saved) {
      if (v) {
        ::setenv(k.c_str(), v->c_str(), 1);
      } else {
        ::unsetenv(k.c_str());
      }
    }
  }

private:
  std::map<std::string, std::optional<std::string>> m_saved;
};

// Runs `body` in a forked child (libslurm's one-time initialisation is
// per process) and returns its exit code; 100+ means the child crashed.
int in_child(const std::function<int()>& body) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::_exit(body());
  }
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
}

const char* k_job_vars[] = {"SLURM_JOB_ID",   "SLURM_JOBID",         "SLURM_JOB_NODELIST",
                            "SLURM_NODELIST", "SLURM_JOB_NAME",      "SLURM_JOB_PARTITION",
                            "SLURM_JOB_USER", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"};

void clear_job_env(ScopedEnv& e) {
  for (const char* v : k_job_vars) {
    e.set(v, std::nullopt);
  }
}

}  // namespace

TEST_CASE("hostlists expand the way Slurm writes them") {
  using slurm::expand_hostlist;
  CHECK(expand_hostlist("n1") == Hosts{"n1"});
  CHECK(expand_hostlist("n[1-3,5]") == Hosts{"n1", "n2", "n3", "n5"});
  CHECK(expand_hostlist("n[01-03]") == Hosts{"n01", "n02", "n03"});
  CHECK(expand_hostlist("n[8-11]") == Hosts{"n8", "n9", "n10", "n11"});
  CHECK(expand_hostlist("n[001-3]") == Hosts{"n001", "n002", "n003"});
  CHECK(expand_hostlist("n1,n[2-3],gpu[01-02]") == Hosts{"n1", "n2", "n3", "gpu01", "gpu02"});
  CHECK(expand_hostlist("rack[1-2]-n[01-02]") == Hosts{"rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"});
  CHECK(expand_hostlist("n[1-2]-ib") == Hosts{"n1-ib", "n2-ib"});
  CHECK(expand_hostlist("n1 n2\tn3") == Hosts{"n1", "n2", "n3"});
  CHECK(expand_hostlist("n[1-2],,n5") == Hosts{"n1", "n2", "n5"});
  CHECK(expand_hostlist("node-a.example.org") == Hosts{"node-a.example.org"});
  CHECK(expand_hostlist("") == Hosts{});
}

TEST_CASE("a malformed hostlist is refused, never half expanded") {
  using slurm::expand_hostlist;
  for (const char* bad :
       {"n[1-3", "n1-3]", "n[3-1]", "n[x-2]", "n[]", "n[1-]", "n[[1-2]]", "n[1-2000000]", "n[1,2,]", "n[-1]"}) {
    CAPTURE(bad);
    CHECK_FALSE(expand_hostlist(bad).has_value());
  }
}

TEST_CASE("node names compress back into a short hostlist for display") {
  using slurm::compress_hostlist;
  CHECK(compress_hostlist({}) == "");
  CHECK(compress_hostlist({"n1"}) == "n1");
  CHECK(compress_hostlist({"n1", "n2", "n3", "n5"}) == "n[1-3,5]");
  CHECK(compress_hostlist({"gpu01", "gpu02", "gpu03"}) == "gpu[01-03]");
  CHECK(compress_hostlist({"n9", "n10", "n11"}) == "n[9-11]");
  CHECK(compress_hostlist({"n1", "n2", "login", "gpu1"}) == "n[1-2],login,gpu1");
  CHECK(compress_hostlist({"n3", "n1", "n2"}) == "n[3,1-2]");
  for (const char* list : {"n[1-3,5]", "gpu[01-02],n[7-9]", "rack1-n[01-04]"}) {
    CAPTURE(list);
    CHECK(compress_hostlist(*slurm::expand_hostlist(list)) == list);
  }
}

#if LHPC_HAVE_SLURM
TEST_CASE("the built-in expander agrees with libslurm on what libslurm accepts") {
  for (const char* list : {"n1", "n[1-3,5]", "n[01-03]", "n[8-11]", "n[001-3]", "n1,n[2-3],gpu[01-02]", "a[1-2]b[3-4]",
                           "rack[1-2]-n[01-02]", "n1 n2", "n[1-2,4-5]", "n[1-2],,n5"}) {
    CAPTURE(list);
    hostlist_t hl = slurm_hostlist_create(list);
    REQUIRE(hl != nullptr);
    Hosts theirs;
    while (char* h = slurm_hostlist_shift(hl)) {
      theirs.emplace_back(h);
      std::free(h);
    }
    slurm_hostlist_destroy(hl);
    CHECK(slurm::expand_hostlist(list) == theirs);
  }
}
#endif

TEST_CASE("outside a job: no allocation, no nodes, nothing to ask") {
  ScopedEnv e;
  clear_job_env(e);
  CHECK_FALSE(slurm::in_allocation());
  CHECK_FALSE(slurm::job_id().has_value());
  CHECK(slurm::node_list().empty());
  CHECK_FALSE(slurm::seconds_left().has_value());
  CHECK_FALSE(slurm::job_info().has_value());
}

TEST_CASE("inside a job the environment alone answers job id and nodes") {
  ScopedEnv e;
  clear_job_env(e);
  e.set("SLURM_JOB_ID", "4242").set("SLURM_JOB_NODELIST", "n[1-3]").set("SLURM_JOB_NAME", "lithops");
  e.set("SLURM_JOB_PARTITION", "debug").set("SLURM_JOB_USER", "alice").set("SLURM_JOB_NUM_NODES", "3");
  CHECK(slurm::in_allocation());
  CHECK(slurm::job_id() == "4242");
  CHECK(slurm::node_list() == Hosts{"n1", "n2", "n3"});

  // Old names still set by srun and older sbatch.
  e.set("SLURM_JOB_ID", std::nullopt).set("SLURM_JOBID", "17");
  e.set("SLURM_JOB_NODELIST", std::nullopt).set("SLURM_NODELIST", "c[07-08]");
  CHECK(slurm::job_id() == "17");
  CHECK(slurm::node_list() == Hosts{"c07", "c08"});
  e.set("SLURM_NODELIST", "c[07-");
  CHECK(slurm::node_list().empty());
}

TEST_CASE("job_info of this job falls back to the environment when the controller cannot answer") {
  // Child process: the unreachable configuration decides libslurm's state for
  // the rest of that process only.
  int rc = in_child([] {
    ::setenv("SLURM_CONF", "/nonexistent/lhpc-test/slurm.conf", 1);
    ::setenv("SLURM_JOB_ID", "4242", 1);
    ::setenv("SLURM_JOB_NODELIST", "n[1-3]", 1);
    ::setenv("SLURM_JOB_NAME", "lithops", 1);
    ::setenv("SLURM_JOB_PARTITION", "debug", 1);
    ::setenv("SLURM_JOB_USER", "alice", 1);
    ::setenv("SLURM_JOB_NUM_NODES", "3", 1);
    auto j = slurm::job_info();
    if (!j) {
      return 1;
    }
    bool ok = j->from_environment && j->job_id == "4242" && j->state == "RUNNING" && j->active() &&
              j->name == "lithops" && j->partition == "debug" && j->user == "alice" && j->num_nodes == 3 &&
              j->nodes == "n[1-3]" && j->node_list == Hosts{"n1", "n2", "n3"} && !j->time_limit;
    if (!ok) {
      return 2;
    }
    if (slurm::job_info("4243")) {
      return 3;  // another job: only the controller could say
    }
    if (slurm::seconds_left()) {
      return 4;
    }
    return 0;
  });
  CHECK(rc == 0);
}

TEST_CASE("a missing or broken Slurm configuration never kills the caller") {
  // libslurm's slurm_init() exits the process on such configurations.
  auto dir = std::filesystem::temp_directory_path() / ("lhpc-test-slurm-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string broken = (dir / "slurm.conf").string();
  std::ofstream(broken) << "this is not a slurm.conf\n";
  for (const std::string& conf : {std::string("/nonexistent/lhpc-test/slurm.conf"), broken}) {
    CAPTURE(conf);
    int rc = in_child([&] {
      ::setenv("SLURM_CONF", conf.c_str(), 1);
      ::setenv("SLURM_JOB_ID", "4242", 1);
      if (slurm::libslurm_available() || slurm::seconds_left() || slurm::seconds_left("4242") ||
          slurm::job_info("99")) {
        return 1;
      }
      return 0;
    });
    CHECK(rc == 0);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("built without libslurm, nothing pretends to know the controller's answers") {
  if (slurm::built_with_libslurm()) {
    return;
  }
  ScopedEnv e;
  e.set("SLURM_JOB_ID", "4242").set("SLURM_JOB_NODELIST", "n[1-2]");
  CHECK_FALSE(slurm::libslurm_available());
  CHECK_FALSE(slurm::seconds_left().has_value());
  CHECK(slurm::job_info()->from_environment);
  CHECK(slurm::node_list() == Hosts{"n1", "n2"});
}

TEST_CASE("a time-left watch answers at once and never blocks its caller") {
  // Outside a job there is nothing to ask: the first answer is "unknown" at once.
  ScopedEnv e;
  clear_job_env(e);
  slurm::TimeLeftWatch watch({}, std::chrono::milliseconds(50));
  for (int i = 0; i < 200 && !watch.asked(); ++i) {
    ::usleep(10'000);
  }
  CHECK(watch.asked());
  CHECK_FALSE(watch.current().has_value());
}

// Run by the e2e suite as: srun -N2 -t 5 test_slurm -tc='live*' with LHPC_TEST_SLURM_LIVE=1.
TEST_CASE("live: inside a Slurm job, libslurm knows the job, its nodes and its time left") {
  if (std::getenv("LHPC_TEST_SLURM_LIVE") == nullptr) {
    return;
  }
  REQUIRE(slurm::in_allocation());
  auto id = slurm::job_id();
  REQUIRE(id.has_value());
  auto nodes = slurm::node_list();
  CHECK(nodes == *slurm::expand_hostlist(std::getenv("SLURM_JOB_NODELIST")));
  CHECK(std::to_string(nodes.size()) == std::string(std::getenv("SLURM_JOB_NUM_NODES")));
  if (!slurm::built_with_libslurm()) {
    return;
  }
  REQUIRE(slurm::libslurm_available());
  auto j = slurm::job_info();
  REQUIRE(j.has_value());
  CHECK_FALSE(j->from_environment);
  CHECK(j->job_id == *id);
  CHECK(j->state == "RUNNING");
  CHECK(j->active());
  CHECK(j->node_list == nodes);
  CHECK(j->num_nodes == nodes.size());
  CHECK(j->start_time.has_value());
  auto left = slurm::seconds_left();
  if (const char* limit = std::getenv("LHPC_TEST_SLURM_TIME_LIMIT_MIN")) {
    CHECK(j->time_limit == doctest::Approx(60.0 * std::atof(limit)));
    REQUIRE(left.has_value());
    CHECK(*left > 0);
    CHECK(*left <= 60.0 * std::atof(limit));
    // Asked again: the limit is cached, the answer still counts down.
    auto again = slurm::seconds_left();
    REQUIRE(again.has_value());
    CHECK(*again <= *left);
    slurm::TimeLeftWatch watch;
    for (int i = 0; i < 500 && !watch.asked(); ++i) {
      ::usleep(10'000);
    }
    REQUIRE(watch.current().has_value());
    CHECK(*watch.current() == doctest::Approx(*again).epsilon(0.05));
  } else {
    CHECK_FALSE(j->time_limit.has_value());
    CHECK_FALSE(left.has_value());  // INFINITE
  }
  CHECK_FALSE(slurm::job_info("4000000000").has_value());
}
