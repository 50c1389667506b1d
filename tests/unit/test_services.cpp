// services/ and the Lithops config editing `up` does: the decisions, with no
// server started (tests/integration/test_up.py starts the real ones).
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "config/lithops_yaml_edit.h"
#include "services/broker.h"
#include "services/lithops_config.h"
#include "services/record.h"
#include "services/redis.h"
#include "services/up.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"

using lhpc::config::set_lithops_keys;
using lhpc::config::YamlSet;

namespace {

const std::vector<YamlSet> k_sets = {
    {"lithops", "backend", "singularity"},
    {"lithops", "storage", "redis"},
    {"rabbitmq", "amqp_url", "amqp://lithops:pw@127.0.0.1:5000"},
    {"redis", "port", "6400", false},
};

}  // namespace

TEST_CASE("up writes its keys into a Lithops config keeping the other keys and every comment") {
  std::string before =
      "# my Lithops settings\n"
      "lithops:\n"
      "    backend: localhost   # was local\n"
      "    log_level: DEBUG\n"
      "\n"
      "# the image\n"
      "singularity:\n"
      "    runtime: my-rt\n"
      "rabbitmq:\n"
      "    amqp_url: |\n"
      "      amqp://old\n"
      "minio:\n"
      "    endpoint: http://x:9000\n";
  auto e = set_lithops_keys(before, k_sets, "cfg");
  CHECK_FALSE(e.comments_lost);
  CHECK(e.text ==
        "# my Lithops settings\n"
        "lithops:\n"
        "    backend: \"singularity\"\n"
        "    log_level: DEBUG\n"
        "    storage: \"redis\"\n"
        "\n"
        "# the image\n"
        "singularity:\n"
        "    runtime: my-rt\n"
        "rabbitmq:\n"
        "    amqp_url: \"amqp://lithops:pw@127.0.0.1:5000\"\n"
        "minio:\n"
        "    endpoint: http://x:9000\n"
        "redis:\n"
        "  port: 6400\n");
}

TEST_CASE("an empty or missing Lithops config gets the sections up writes") {
  auto e = set_lithops_keys("", k_sets, "cfg");
  CHECK_FALSE(e.comments_lost);
  CHECK(e.text ==
        "lithops:\n  backend: \"singularity\"\n  storage: \"redis\"\nrabbitmq:\n"
        "  amqp_url: \"amqp://lithops:pw@127.0.0.1:5000\"\nredis:\n  port: 6400\n");
}

TEST_CASE("writing the same settings again changes nothing") {
  auto once = set_lithops_keys("lithops:\n  backend: aws_lambda\n", k_sets, "cfg").text;
  CHECK(set_lithops_keys(once, k_sets, "cfg").text == once);
}

TEST_CASE("a flow-style Lithops config is rewritten by yaml-cpp, and the caller told comments are gone") {
  auto e = set_lithops_keys("# note\nlithops: {backend: localhost, log_level: INFO}\n", k_sets, "cfg");
  CHECK(e.comments_lost);
  CHECK(e.text.find("log_level: INFO") != std::string::npos);
  CHECK(e.text.find("backend: singularity") != std::string::npos);
}

TEST_CASE("a Lithops config that is not a mapping is refused naming the file") {
  CHECK_THROWS_WITH_AS(set_lithops_keys("- a\n- b\n", k_sets, "/x/config"), doctest::Contains("/x/config"),
                       lhpc::Error);
}

TEST_CASE("up's Lithops config is created 0600 and the previous one kept as .bak") {
  lhpc::test::TempDir d;
  auto path = d.file("lithops/config");
  auto w = lhpc::services::write_lithops_config(path, k_sets);
  CHECK(w.changed);
  CHECK(w.backup.empty());
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  auto again = lhpc::services::write_lithops_config(path, k_sets);
  CHECK_FALSE(again.changed);
  auto other = k_sets;
  other[1].value = "minio";
  auto third = lhpc::services::write_lithops_config(path, other);
  CHECK(third.backup == path + ".bak");
  CHECK(lhpc::read_file(third.backup).find("storage: \"redis\"") != std::string::npos);
  CHECK(lhpc::read_file(path).find("storage: \"minio\"") != std::string::npos);
}

TEST_CASE("the store's memory defaults to a quarter of the node's, within 256 MiB and 8 GiB") {
  constexpr std::uint64_t mib = 1024 * 1024;
  CHECK(lhpc::services::default_storage_memory(512 * mib) == 256 * mib);
  CHECK(lhpc::services::default_storage_memory(16384 * mib) == 4096 * mib);
  CHECK(lhpc::services::default_storage_memory(256 * 1024 * mib) == 8192 * mib);
}

TEST_CASE("NFS, Lustre and GPFS are network file systems for up; ext4 and tmpfs are not") {
  CHECK(lhpc::services::is_network_fs(0x6969));
  CHECK(lhpc::services::is_network_fs(0x0BD00BD0));
  CHECK(lhpc::services::is_network_fs(0x47504653));
  CHECK_FALSE(lhpc::services::is_network_fs(0xEF53));
  CHECK_FALSE(lhpc::services::is_network_fs(0x01021994));
}

TEST_CASE("the store refuses writes when full rather than evict, on loopback unless bound") {
  lhpc::services::RedisSetup s{"/d", "redis-server", "", 6400, 1 << 30};
  auto conf = lhpc::services::redis_conf(s, "secret");
  CHECK(conf.find("maxmemory 1073741824\n") != std::string::npos);
  CHECK(conf.find("maxmemory-policy noeviction\n") != std::string::npos);
  CHECK(conf.find("bind 127.0.0.1\n") != std::string::npos);
  CHECK(conf.find("requirepass secret\n") != std::string::npos);
  CHECK(conf.find("port 6400\n") != std::string::npos);
}

TEST_CASE("with the broker's TLS the store speaks TLS only, with its certificate, and asks clients for none") {
  lhpc::services::RedisSetup s{"/d", "redis-server", "0.0.0.0", 6400, 1 << 30, {"/c/cert.pem", "/c/key.pem", ""}};
  auto conf = lhpc::services::redis_conf(s, "secret");
  CHECK(conf.find("port 0\ntls-port 6400\n") != std::string::npos);
  CHECK(conf.find("tls-cert-file /c/cert.pem\ntls-key-file /c/key.pem\n") != std::string::npos);
  CHECK(conf.find("tls-auth-clients no\n") != std::string::npos);
  CHECK(conf.find("tls-ca-cert-file") == std::string::npos);
  CHECK(conf.find("port 6400\n") == conf.find("tls-port 6400\n") + 4);  // no plain listener
  s.tls.ca = "/c/ca.pem";
  CHECK(lhpc::services::redis_conf(s, "secret").find("tls-ca-cert-file /c/ca.pem\n") != std::string::npos);
}

TEST_CASE("the services record survives a round trip through its JSON") {
  lhpc::services::Record r;
  r.host = "login1";
  r.data_dir = "/var/tmp/x";
  r.running = true;
  r.redis_managed = true;
  r.redis_port = 6400;
  r.controller_pid = 42;
  r.tls_cert = "/c/cert.pem";
  r.tls_ca = "/c/ca.pem";
  auto back = lhpc::services::record_from_json(lhpc::services::to_json(r), "t");
  CHECK(back.host == "login1");
  CHECK(back.data_dir == "/var/tmp/x");
  CHECK(back.running);
  CHECK(back.redis_port == 6400);
  CHECK(back.controller_pid == 42);
  CHECK(back.tls_cert == "/c/cert.pem");
  CHECK(back.tls_ca == "/c/ca.pem");
  CHECK_THROWS_AS(lhpc::services::record_from_json("{}", "t"), lhpc::Error);
}

namespace {

// The Error `f` throws; fails the case when it throws none.
template <typename F>
lhpc::Error refusal(F&& f) {
  try {
    f();
  } catch (const lhpc::Error& e) {
    return e;
  }
  FAIL("accepted");
  return lhpc::Error(lhpc::Exit::ok, "");
}

bool says(const lhpc::Error& e, const std::string& words) {
  return std::string(e.what()).find(words) != std::string::npos;
}

}  // namespace

TEST_CASE("a services pid file another user owns, that is a link, or that others can write is refused, named") {
  lhpc::test::TempDir d("services");
  auto run = d.file("run");
  REQUIRE(::mkdir(run.c_str(), 0700) == 0);
  auto pid_file = run + "/server.pid";
  auto check_refused = [&](const std::string& why) {
    auto e = refusal([&] { (void)lhpc::services::broker_running(d.path); });
    CHECK(says(e, "the broker's pid file"));
    CHECK(says(e, why));
    CHECK_FALSE(e.hint().empty());
  };
  SUBCASE("another user's file") {
    d.write("run/server.pid", std::to_string(::getpid()));
    REQUIRE(::chown(pid_file.c_str(), lhpc::test::k_nobody, lhpc::test::k_nobody) == 0);
    check_refused("belongs to");
  }
  SUBCASE("a symbolic link") {
    auto real = d.write("elsewhere.pid", std::to_string(::getpid()));
    REQUIRE(::symlink(real.c_str(), pid_file.c_str()) == 0);
    check_refused("symbolic link");
  }
  SUBCASE("writable by the group") {
    d.write("run/server.pid", std::to_string(::getpid()), 0620);
    check_refused("writable by other users");
  }
  SUBCASE("writable by everyone") {
    d.write("run/server.pid", std::to_string(::getpid()), 0606);
    check_refused("writable by other users");
  }
  SUBCASE("in a directory another user owns") {
    d.write("run/server.pid", std::to_string(::getpid()));
    REQUIRE(::chown(run.c_str(), lhpc::test::k_nobody, lhpc::test::k_nobody) == 0);
    check_refused("belongs to");
  }
  SUBCASE("in a directory others can write") {
    d.write("run/server.pid", std::to_string(::getpid()));
    REQUIRE(::chmod(run.c_str(), 0777) == 0);
    check_refused("writable by other users");
  }
}

TEST_CASE("the storage's pid file is refused when another user owns it or others can write it") {
  lhpc::test::TempDir d("services");
  auto pid_file = d.write("redis.pid", std::to_string(::getpid()));
  SUBCASE("another user's file") {
    REQUIRE(::chown(pid_file.c_str(), lhpc::test::k_nobody, lhpc::test::k_nobody) == 0);
  }
  SUBCASE("writable by the group") { REQUIRE(::chmod(pid_file.c_str(), 0660) == 0); }
  auto e = refusal([&] { (void)lhpc::services::stop_redis(d.path, std::chrono::milliseconds(100)); });
  CHECK(says(e, "the storage's pid file"));
  CHECK(says(e, pid_file));
}

TEST_CASE("a pid file naming another process of ours is neither taken for the service nor signalled") {
  lhpc::test::TempDir d("services");
  lhpc::SpawnOptions o;
  o.argv = {"sleep", "30"};
  auto other = lhpc::spawn(o);
  REQUIRE(::mkdir(d.file("run").c_str(), 0700) == 0);
  d.write("run/server.pid", std::to_string(other.pid()) + "\n");
  d.write("redis.pid", std::to_string(other.pid()) + "\n");
  CHECK_FALSE(lhpc::services::broker_running(d.path));
  CHECK_FALSE(lhpc::services::stop_redis(d.path, std::chrono::milliseconds(100)));
  CHECK_FALSE(lhpc::services::redis_alive(d.path, 1, ""));
  CHECK_FALSE(other.try_wait());  // not signalled
}

TEST_CASE("up refuses a Lithops config, or its directory, that another user owns, links or can write") {
  lhpc::test::TempDir d("services");
  auto path = d.file("config");
  std::string before = "lithops:\n  backend: localhost\n";
  auto check_refused = [&](const std::string& where, const std::string& why) {
    auto e = refusal([&] { (void)lhpc::services::write_lithops_config(where, k_sets); });
    CHECK(e.code() == lhpc::Exit::config);
    CHECK(says(e, "the Lithops config"));
    CHECK(says(e, why));
    CHECK_FALSE(e.hint().empty());
  };
  SUBCASE("a file another user owns") {
    d.write("config", before);
    REQUIRE(::chown(path.c_str(), lhpc::test::k_nobody, lhpc::test::k_nobody) == 0);
    check_refused(path, "belongs to");
    CHECK(lhpc::read_file(path) == before);
    CHECK_FALSE(lhpc::path_exists(path + ".bak"));
  }
  SUBCASE("a file others can write") {
    d.write("config", before, 0664);
    check_refused(path, "writable by other users");
    CHECK(lhpc::read_file(path) == before);
  }
  SUBCASE("a link another user made") {
    auto real = d.write("real-config", before);
    REQUIRE(::symlink(real.c_str(), path.c_str()) == 0);
    REQUIRE(::lchown(path.c_str(), lhpc::test::k_nobody, lhpc::test::k_nobody) == 0);
    check_refused(path, "symbolic link");
    CHECK(lhpc::read_file(real) == before);
  }
  SUBCASE("a directory another user owns") {
    auto theirs = d.file("theirs");
    REQUIRE(::mkdir(theirs.c_str(), 0755) == 0);
    REQUIRE(::chown(theirs.c_str(), lhpc::test::k_nobody, lhpc::test::k_nobody) == 0);
    check_refused(theirs + "/config", "belongs to");
    CHECK_FALSE(lhpc::path_exists(theirs + "/config"));
  }
  SUBCASE("a directory others can write") {
    auto open = d.file("open");
    REQUIRE(::mkdir(open.c_str(), 0755) == 0);
    REQUIRE(::chmod(open.c_str(), 0777) == 0);
    check_refused(open + "/config", "writable by other users");
    CHECK_FALSE(lhpc::path_exists(open + "/config"));
  }
}

TEST_CASE("up writes a Lithops config through a link of the user's own, keeping the link") {
  lhpc::test::TempDir d("services");
  REQUIRE(::mkdir(d.file("dotfiles").c_str(), 0700) == 0);
  auto real = d.write("dotfiles/config", "lithops:\n  backend: localhost\n");
  auto link = d.file("config");
  REQUIRE(::symlink(real.c_str(), link.c_str()) == 0);
  auto w = lhpc::services::write_lithops_config(link, k_sets);
  CHECK(w.changed);
  CHECK(w.backup == real + ".bak");
  struct stat st {};
  REQUIRE(::lstat(link.c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  CHECK(lhpc::read_file(real).find("storage: \"redis\"") != std::string::npos);
}
