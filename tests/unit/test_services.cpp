// services/ and the Lithops config editing `up` does: the decisions, with no
// server started (tests/integration/test_up.py starts the real ones).
#include <doctest/doctest.h>
#include <sys/stat.h>

#include "config/lithops_yaml_edit.h"
#include "services/lithops_config.h"
#include "services/record.h"
#include "services/redis.h"
#include "services/up.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"

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

TEST_CASE("the services record survives a round trip through its JSON") {
  lhpc::services::Record r;
  r.host = "login1";
  r.data_dir = "/var/tmp/x";
  r.running = true;
  r.redis_managed = true;
  r.redis_port = 6400;
  r.controller_pid = 42;
  auto back = lhpc::services::record_from_json(lhpc::services::to_json(r), "t");
  CHECK(back.host == "login1");
  CHECK(back.data_dir == "/var/tmp/x");
  CHECK(back.running);
  CHECK(back.redis_port == 6400);
  CHECK(back.controller_pid == 42);
  CHECK_THROWS_AS(lhpc::services::record_from_json("{}", "t"), lhpc::Error);
}
