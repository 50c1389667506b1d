// Configuration: every error class names file:line:col and the key; defaults,
// placeholders, the AMQP_URL override and redaction.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "test_support.h"
#include "config/config.h"
#include "util/error.h"

using lhpc::test::TempDir;
using lhpc::test::EnvGuard;
using namespace lhpc;
using namespace lhpc::config;

namespace {

std::string error_of(const std::string& toml) {
  try {
    parse(toml, "site.toml");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    return std::string(e.what()) + " | " + e.hint();
  }
  FAIL("expected a config error for: " << toml);
  return {};
}



}  // namespace

TEST_CASE("defaults follow the design when the file is empty") {
  auto c = parse("", "empty.toml");
  CHECK(c.singularity.sif_path == "/tmp");
  CHECK(c.singularity.instance_name == "lithops-worker");
  CHECK(c.singularity.engine == Engine::singularity);
  CHECK(c.rabbitmq.queue == "task_queue");
  CHECK(c.deploy.transfer == Transfer::mpi);
  CHECK(c.deploy.mode == Mode::dispatch);
  CHECK(c.health.interval == 5.0);
}

TEST_CASE("a full file maps one to one onto Lithops' keys") {
  auto c = parse(R"([singularity]
sif_path = "/scratch/%u/sif"
runtime = "my-rt"
engine = "apptainer"
worker_processes = 4
binds = ["/scratch", "/data:/data:ro"]
[rabbitmq]
amqp_url = "amqp://alice:s3cret@broker:5672/lithops"
[deploy]
transfer = "sbcast"
chunk_mib = 16
[health]
interval = 2.5
)",
                 "full.toml");
  CHECK(c.singularity.runtime == "my-rt");
  CHECK(c.singularity.engine == Engine::apptainer);
  CHECK(c.singularity.worker_processes == 4);
  CHECK(c.singularity.binds.size() == 2);
  CHECK(c.rabbitmq.amqp_url == "amqp://alice:s3cret@broker:5672/lithops");
  CHECK(c.deploy.transfer == Transfer::sbcast);
  CHECK(c.deploy.chunk_mib == 16);
  CHECK(c.health.interval == 2.5);
}

TEST_CASE("syntax errors name file:line:col") {
  auto msg = error_of("[singularity]\nsif_path = \"/tmp\n");
  CHECK(msg.find("site.toml:2:") != std::string::npos);
}

TEST_CASE("unknown keys are errors with a suggestion") {
  auto msg = error_of("[singularity]\nsif_pth = \"/tmp\"\n");
  CHECK(msg.find("site.toml:2:1") != std::string::npos);
  CHECK(msg.find("unknown key singularity.sif_pth") != std::string::npos);
  CHECK(msg.find("did you mean 'sif_path'") != std::string::npos);
}

TEST_CASE("unknown sections are errors with a suggestion") {
  auto msg = error_of("[rabitmq]\namqp_url = \"amqp://h\"\n");
  CHECK(msg.find("site.toml:1:1") != std::string::npos);
  CHECK(msg.find("unknown section [rabitmq]") != std::string::npos);
  CHECK(msg.find("did you mean 'rabbitmq'") != std::string::npos);
}

TEST_CASE("wrong types name the key, the expected and the found type") {
  auto msg = error_of("[deploy]\n\nchunk_mib = \"8\"\n");
  CHECK(msg.find("site.toml:3:13") != std::string::npos);
  CHECK(msg.find("deploy.chunk_mib") != std::string::npos);
  CHECK(msg.find("expected an integer") != std::string::npos);
  CHECK(msg.find("string") != std::string::npos);
}

TEST_CASE("enumerations list their choices") {
  auto msg = error_of("[singularity]\nengine = \"docker\"\n");
  CHECK(msg.find("site.toml:2:10") != std::string::npos);
  CHECK(msg.find("singularity, apptainer, host") != std::string::npos);
}

TEST_CASE("out of range numbers say the range") {
  auto msg = error_of("[deploy]\nchunk_mib = 0\n");
  CHECK(msg.find("deploy.chunk_mib") != std::string::npos);
  CHECK(msg.find("from 1 to 1024") != std::string::npos);
}

TEST_CASE("a bad URL is an error at its position, printed redacted") {
  auto msg = error_of("[rabbitmq]\namqp_url = \"http://u:pw@host\"\n");
  CHECK(msg.find("site.toml:2:12") != std::string::npos);
  CHECK(msg.find("rabbitmq.amqp_url") != std::string::npos);
  CHECK(msg.find("pw") == std::string::npos);
  auto port = error_of("[rabbitmq]\namqp_url = \"amqp://u:pw@host:99999/\"\n");
  CHECK(port.find("bad port") != std::string::npos);
  CHECK(port.find("pw") == std::string::npos);
}

TEST_CASE("a missing required key says where to set it") {
  auto c = parse("[rabbitmq]\nqueue = \"q\"\n", "site.toml");
  try {
    require_amqp_url(c);
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    CHECK(std::string(e.what()).find("rabbitmq.amqp_url is required (site.toml)") != std::string::npos);
    CHECK(e.hint().find("AMQP_URL") != std::string::npos);
  }
}

TEST_CASE("invalid instance names are refused") {
  auto msg = error_of("[singularity]\ninstance_name = \"a b\"\n");
  CHECK(msg.find("not a valid instance name") != std::string::npos);
}

TEST_CASE("redaction hides the password and only the password") {
  CHECK(redact_url("amqp://alice:s3cret@broker:5672/lithops") == "amqp://alice:***@broker:5672/lithops");
  CHECK(redact_url("amqps://alice:p@ss@broker/") == "amqps://alice:***@broker/");
  CHECK(redact_url("amqp://broker:5672/") == "amqp://broker:5672/");
  CHECK(redact_url("amqp://alice@broker") == "amqp://alice@broker");
  auto c = parse("[rabbitmq]\namqp_url = \"amqp://alice:s3cret@broker/v\"\n", "x.toml");
  auto text = to_toml(c);
  CHECK(text.find("s3cret") == std::string::npos);
  CHECK(text.find("amqp://alice:***@broker/v") != std::string::npos);
}

TEST_CASE("AMQP URLs are parsed per the spec") {
  auto u = parse_amqp_url("amqps://us%40r:p%3Aw@host.example:5999/my%2Fvhost");
  CHECK(u.tls);
  CHECK(u.user == "us@r");
  CHECK(u.password == "p:w");
  CHECK(u.host == "host.example");
  CHECK(u.port == 5999);
  CHECK(u.vhost == "my/vhost");
  auto d = parse_amqp_url("amqp://h");
  CHECK(d.port == 5672);
  CHECK(d.vhost == "/");
  CHECK(parse_amqp_url("amqps://h").port == 5671);
  CHECK_THROWS_AS(parse_amqp_url("amqp://:5672/"), Error);
}

TEST_CASE("placeholders expand like Slurm's filename patterns") {
  Placeholders ph{"4242", "n3", "alice"};
  CHECK(expand("/scratch/%u/%j/%n", ph) == "/scratch/alice/4242/n3");
  CHECK(expand("100%%", ph) == "100%");
  CHECK_THROWS_AS(expand("/tmp/%x", ph), Error);
  CHECK_THROWS_AS(expand("/tmp/%", ph), Error);
  auto c = parse("[singularity]\nsif_path = \"/tmp/%u-%j\"\nbinds=[\"/d/%n\"]\n", "x.toml");
  auto e = expanded(c, ph);
  CHECK(e.singularity.sif_path == "/tmp/alice-4242");
  CHECK(e.singularity.binds[0] == "/d/n3");
  CHECK(c.singularity.sif_path == "/tmp/%u-%j");
}

TEST_CASE("placeholders come from Slurm's environment") {
  EnvGuard j("SLURM_JOB_ID", "777");
  EnvGuard n("LITHOPS_HPC_NODE_ID", "node-x");
  auto ph = current_placeholders();
  CHECK(ph.jobid == "777");
  CHECK(ph.node == "node-x");
}

TEST_CASE("lookup order: --config, then LITHOPS_HPC_CONFIG, then XDG") {
  TempDir d{"config"};
  auto a = d.write("a.toml", "[rabbitmq]\nqueue = \"from-a\"\n");
  auto b = d.write("b.toml", "[rabbitmq]\nqueue = \"from-b\"\n");
  std::filesystem::create_directories(d.file("xdg/lithops-hpc"));
  d.write("xdg/lithops-hpc/config.toml", "[rabbitmq]\nqueue = \"from-xdg\"\n");
  EnvGuard amqp("AMQP_URL", nullptr);
  EnvGuard xdg("XDG_CONFIG_HOME", d.file("xdg").c_str());
  {
    EnvGuard env("LITHOPS_HPC_CONFIG", b.c_str());
    CHECK(load(a).rabbitmq.queue == "from-a");
    CHECK(load("").rabbitmq.queue == "from-b");
  }
  EnvGuard env("LITHOPS_HPC_CONFIG", nullptr);
  CHECK(load("").rabbitmq.queue == "from-xdg");
  CHECK_THROWS_AS(load(d.file("missing.toml")), Error);
}

TEST_CASE("AMQP_URL in the environment overrides the file") {
  TempDir d{"config"};
  auto f = d.write("c.toml", "[rabbitmq]\namqp_url = \"amqp://u:p@filehost/\"\n");
  EnvGuard amqp("AMQP_URL", "amqp://u:p@envhost/");
  auto c = load(f);
  CHECK(c.rabbitmq.amqp_url == "amqp://u:p@envhost/");
  CHECK(c.amqp_url_from_env);
}

TEST_CASE("a readable file holding a password is a warning") {
  TempDir d{"config"};
  EnvGuard amqp("AMQP_URL", nullptr);
  auto open = d.write("open.toml", "[rabbitmq]\namqp_url = \"amqp://u:secret@h/\"\n", 0644);
  auto closed = d.write("closed.toml", "[rabbitmq]\namqp_url = \"amqp://u:secret@h/\"\n", 0600);
  auto c = load(open);
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0].find("chmod 600") != std::string::npos);
  CHECK(c.warnings[0].find("secret") == std::string::npos);
  CHECK(load(closed).warnings.empty());
}
