// Configuration: every error class names file:line:col and the key; defaults,
// placeholders, the AMQP_URL override and redaction; the user's Lithops YAML,
// precedence and origins; the client-side checks; inputs toml++ 3.3.0 cannot
// take; files that are not regular files; files another user controls.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "config/client_lint.h"
#include "config/config.h"
#include "config/text_guard.h"
#include "sif_fixtures.h"
#include "test_support.h"
#include "util/error.h"

using lhpc::test::as_nobody;
using lhpc::test::CwdGuard;
using lhpc::test::EnvGuard;
using lhpc::test::SharedDir;
using lhpc::test::TempDir;
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

// load() also reads the user's Lithops config: keep the machine's out of tests.
struct NoLithopsConfig {
  explicit NoLithopsConfig(const TempDir& d) : home("HOME", d.str().c_str()) {}
  EnvGuard home;
  EnvGuard file{"LITHOPS_CONFIG_FILE", nullptr};
  EnvGuard json{"LITHOPS_CONFIG", nullptr};
};

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

TEST_CASE("an unknown section lists every section there is") {
  auto msg = error_of("[nosuch]\nx = 1\n");
  CHECK(msg.find("sections are [singularity], [rabbitmq], [deploy], [health], [logs], [autoalloc]") !=
        std::string::npos);
}

TEST_CASE("enum names: one table each gives the text, reads it back, and refuses in one set of words") {
  CHECK(k_engine_names.text(Engine::apptainer) == "apptainer");
  CHECK(k_engine_names.parse("host") == Engine::host);
  CHECK(!k_engine_names.parse("Host"));
  CHECK(k_engine_names.error("host").empty());
  CHECK(k_engine_names.error("docker") == "'docker' is not one of singularity, apptainer, host");
  CHECK(k_transfer_names.error("scp") == "'scp' is not one of mpi, sbcast, none");
  CHECK(k_mode_names.error("batch") == "'batch' is not one of dispatch, runscript");
  CHECK(k_mode_names.text(static_cast<Mode>(7)) == "unknown");
  CHECK(error_of("[singularity]\ngpu_vendor = \"intel\"\n")
            .find("singularity.gpu_vendor: 'intel' is not one of nvidia, amd") != std::string::npos);
  CHECK(error_of("[autoalloc]\ngpu_request = \"gpus\"\n")
            .find("autoalloc.gpu_request: 'gpus' is not one of gpus-per-node, gres") != std::string::npos);
  CHECK(parse("", "empty.toml").autoalloc.gpu_request == GpuRequest::gpus_per_node);
  CHECK(error_of("[singularity]\ngpus_per_slot = -1\n").find("out of range") != std::string::npos);
  // The TOML key refuses in the same words as the flag's check.
  CHECK(error_of("[deploy]\ntransfer = \"scp\"\n").find("deploy.transfer: 'scp' is not one of mpi, sbcast, none") !=
        std::string::npos);
}

TEST_CASE("every key the listing shows is one the reader takes back, with the same value") {
  auto c = parse(R"([singularity]
engine = "apptainer"
binds = ["/a", "/b:/c"]
worker_processes = 3
gpus_per_slot = 2
gpu_vendor = "amd"
[rabbitmq]
amqp_url = "amqp://h.example:5673/v"
heartbeat = 0
[deploy]
transfer = "sbcast"
mode = "runscript"
drain_timeout = 1.5
[logs]
dir = "state"
[autoalloc]
sbatch_args = ["--qos=low"]
drain_on_exit = true
gpu_request = "gres"
)",
                 "site.toml");
  auto listed = to_toml(c);
  auto again = parse(listed, "listed.toml");
  CHECK(to_toml(again) == listed);
  CHECK(again.singularity.engine == Engine::apptainer);
  CHECK(again.deploy.drain_timeout == 1.5);
  CHECK(again.autoalloc.sbatch_args == std::vector<std::string>{"--qos=low"});
  CHECK(again.singularity.gpus_per_slot == 2);
  CHECK(again.singularity.gpu_vendor == GpuVendor::amd);
  CHECK(again.autoalloc.gpu_request == GpuRequest::gres);
  // Every key of every section is listed, once.
  std::size_t keys = 0;
  for (std::size_t at = listed.find(" = "); at != std::string::npos; at = listed.find(" = ", at + 1)) {
    ++keys;
  }
  CHECK(keys == 50);
}

TEST_CASE("out of range numbers say the range") {
  auto msg = error_of("[deploy]\nchunk_mib = 0\n");
  CHECK(msg.find("deploy.chunk_mib") != std::string::npos);
  CHECK(msg.find("from 1 to 1024") != std::string::npos);
}

TEST_CASE("[logs]: where handler output goes, its cap, the progress line") {
  auto c = config::parse("[logs]\ndir = \"/scratch/%u/logs\"\nmax_bytes = 8192\nprogress_interval = 0\n", "site.toml");
  CHECK(c.logs.dir == "/scratch/%u/logs");
  CHECK(c.logs.max_bytes == 8192);
  CHECK(c.logs.progress_interval == 0);
  CHECK(config::parse("", "site.toml").logs.dir == "node");
  CHECK(config::expanded(c, {.jobid = "7", .node = "n1", .user = "alice"}).logs.dir == "/scratch/alice/logs");
  auto msg = error_of("[logs]\ndir = \"relative/dir\"\n");
  CHECK(msg.find("site.toml:2:7") != std::string::npos);
  CHECK(msg.find("not one of node, state or an absolute path") != std::string::npos);
  CHECK(error_of("[logs]\nmax_bytes = 100\n").find("from 4096") != std::string::npos);
  CHECK(config::logs_dir_error("state").empty());
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
  NoLithopsConfig no_lithops{d};
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
  NoLithopsConfig no_lithops{d};
  auto f = d.write("c.toml", "[rabbitmq]\namqp_url = \"amqp://u:p@filehost/\"\n");
  EnvGuard amqp("AMQP_URL", "amqp://u:p@envhost/");
  auto c = load(f);
  CHECK(c.rabbitmq.amqp_url == "amqp://u:p@envhost/");
  CHECK(c.amqp_url_from_env);
}

TEST_CASE("a readable file holding a password is a warning") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  EnvGuard amqp("AMQP_URL", nullptr);
  // localhost: no warning about the password crossing the network.
  auto open = d.write("open.toml", "[rabbitmq]\namqp_url = \"amqp://u:secret@localhost/\"\n", 0644);
  auto closed = d.write("closed.toml", "[rabbitmq]\namqp_url = \"amqp://u:secret@localhost/\"\n", 0600);
  auto c = load(open);
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0].find("chmod 600") != std::string::npos);
  CHECK(c.warnings[0].find("secret") == std::string::npos);
  CHECK(load(closed).warnings.empty());
}

// ---- issue 12: URLs whose password holds URL delimiters ----------------------

TEST_CASE("a password holding a raw '/', '@' or ':' is never shown") {
  CHECK(redact_url("amqp://alice:Zq/9xK@broker:5672/v") == "amqp://alice:***@broker:5672/v");
  CHECK(redact_url("amqp://alice:Zq/9@x:K@broker/v") == "amqp://alice:***@broker/v");
  CHECK(redact_url("amqps://alice:a?b#c@broker/") == "amqps://alice:***@broker/");
  // The last one has no host: without an '@', "Zq9xK" reads as a bad port.
  for (const auto* url :
       {"amqp://alice:Zq/9xK@broker:5672/v", "amqp://alice:Zq9xK@broker:99999/", "amqp://alice:Zq9xK/v"}) {
    try {
      parse_amqp_url(url);
      FAIL("expected an error for a URL");
    } catch (const Error& e) {
      std::string all = std::string(e.what()) + e.hint();
      CHECK(e.code() == Exit::config);
      CHECK(all.find("Zq") == std::string::npos);
      CHECK(all.find("9xK") == std::string::npos);
    }
  }
  // Raw '@' in the password: the userinfo ends at the last '@'.
  auto u = parse_amqp_url("amqp://alice:p@ss@broker:5673/v");
  CHECK(u.password == "p@ss");
  CHECK(u.host == "broker");
  CHECK(u.port == 5673);
}

// ---- issue 12: TLS off in silence ---------------------------------------------

TEST_CASE("verify_peer = false and a password in clear to another host are warnings") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  EnvGuard amqp("AMQP_URL", nullptr);
  auto off =
      load(d.write("off.toml", "[rabbitmq]\namqp_url = \"amqps://u:pw@broker.example/\"\nverify_peer = false\n"));
  REQUIRE(off.warnings.size() == 1);
  CHECK(off.warnings[0].find("verify_peer = false (" + d.file("off.toml") + ":3)") != std::string::npos);
  CHECK(off.warnings[0].find("certificate") != std::string::npos);

  auto clear = load(d.write("clear.toml", "[rabbitmq]\namqp_url = \"amqp://u:Zq9xK@broker.example/\"\n"));
  REQUIRE(clear.warnings.size() == 1);
  CHECK(clear.warnings[0].find("in clear to broker.example") != std::string::npos);
  CHECK(clear.warnings[0].find("amqps://") != std::string::npos);
  CHECK(clear.warnings[0].find("Zq9xK") == std::string::npos);

  CHECK(load(d.write("lo.toml", "[rabbitmq]\namqp_url = \"amqp://u:pw@127.0.0.1/\"\n")).warnings.empty());
  CHECK(load(d.write("tls.toml", "[rabbitmq]\namqp_url = \"amqps://u:pw@broker.example/\"\n")).warnings.empty());
  CHECK(load(d.write("nopw.toml", "[rabbitmq]\namqp_url = \"amqp://broker.example/\"\n")).warnings.empty());
}

// ---- issue 12: inputs that hang or slip ----------------------------------------

TEST_CASE("a FIFO or a directory given as config is refused at once") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  REQUIRE(::mkfifo(d.file("fifo").c_str(), 0600) == 0);
  try {
    load(d.file("fifo"));
    FAIL("a FIFO was read as a config");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    CHECK(std::string(e.what()).find("not a regular file") != std::string::npos);
  }
  try {
    load(d.str());
    FAIL("a directory was read as a config");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    CHECK(std::string(e.what()).find("is a directory") != std::string::npos);
  }
}

// ---- issue 20: configuration another user controls ------------------------------

namespace {
std::string refusal_of(const std::string& explicit_path) {
  try {
    load(explicit_path);
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    return std::string(e.what()) + " | " + e.hint();
  }
  FAIL("another user's configuration was read");
  return {};
}
}  // namespace

TEST_CASE("another user's ./.lithops_config, --config file or link to one is refused, naming file and owner") {
  SharedDir shared{"config"};  // like a shared or sticky directory sbatch jobs start in
  TempDir home{"config"};
  NoLithopsConfig no_lithops{home};
  EnvGuard amqp("AMQP_URL", nullptr);
  EnvGuard hpc("LITHOPS_HPC_CONFIG", nullptr);
  EnvGuard xdg("XDG_CONFIG_HOME", home.file("xdg").c_str());
  auto theirs = shared.file(".lithops_config");
  REQUIRE(as_nobody({"sh", "-c", "printf 'rabbitmq:\n  amqp_url: amqp://u:p@attacker/\n' >" + theirs}));
  {
    CwdGuard cwd(shared.str());
    auto msg = refusal_of("");
    CHECK(msg.find(theirs + " belongs to nobody (uid 65534), neither to you nor to root") != std::string::npos);
  }
  auto toml = shared.file("site.toml");
  REQUIRE(as_nobody({"sh", "-c", "printf '[rabbitmq]\\nqueue = \"theirs\"\\n' >" + toml}));
  CHECK(refusal_of(toml).find(toml + " belongs to nobody") != std::string::npos);
  // A link they planted, even to a file of ours: they chose where it leads.
  auto mine = home.write("mine.toml", "[rabbitmq]\nqueue = \"mine\"\n", 0644);
  REQUIRE(as_nobody({"ln", "-s", mine, shared.file("link.toml")}));
  CHECK(refusal_of(shared.file("link.toml")).find("symbolic link of nobody") != std::string::npos);
  // Ours, but writable by others: refused with the chmod that fixes it.
  auto open_to_all = home.write("open.toml", "[rabbitmq]\nqueue = \"open\"\n", 0666);
  CHECK(refusal_of(open_to_all).find("is writable by other users (mode 0666)") != std::string::npos);
  // Ours in the same shared sticky directory, and a link of ours: read.
  auto ok = shared.write("ours.toml", "[rabbitmq]\nqueue = \"ours\"\n", 0644);
  CHECK(load(ok).rabbitmq.queue == "ours");
  REQUIRE(::symlink(mine.c_str(), shared.file("our-link.toml").c_str()) == 0);
  CHECK(load(shared.file("our-link.toml")).rabbitmq.queue == "mine");
}

TEST_CASE("a 50,000-character instance name is refused without a regex") {
  auto msg = error_of("[singularity]\ninstance_name = \"" + std::string(50000, 'a') + "\"\n");
  CHECK(msg.find("site.toml:2:17") != std::string::npos);
  CHECK(msg.find("1 to 64 characters, this one 50000") != std::string::npos);
  auto ok = parse("[singularity]\ninstance_name = \"" + std::string(64, 'a') + "\"\n", "x");
  CHECK(ok.singularity.instance_name.size() == 64);
}

// ---- issue 12: toml++ 3.3.0 on non-ASCII input ----------------------------------

TEST_CASE("inputs toml++ 3.3.0 mishandles are refused before it sees them") {
  // upstream #190: non-ASCII first after a line-ending backslash in """.
  auto m190 = error_of("[singularity]\npython = \"\"\"\\\n\xc2\xa7\"\"\"\n");
  CHECK(m190.find("site.toml:3:1") != std::string::npos);
  CHECK(m190.find("line-ending backslash") != std::string::npos);
  // upstream #295: a bare combining mark.
  CHECK(error_of("\xcc\xaa").find("site.toml:1:1: non-ASCII character outside a string") != std::string::npos);
  CHECK(error_of("[deploy]\nchunk_mib = 8 \xcc\xaa\n").find("site.toml:2:15") != std::string::npos);
  CHECK(error_of("[deploy]\xcc\xaa\n").find("site.toml:1:9") != std::string::npos);
  // A quote after a bare value character opens no string: what follows is outside one (fuzz).
  CHECK(error_of("[rabbitmq]\namqp_url = 0\"a\xc3\x8c\"\n")
            .find("site.toml:2:15: non-ASCII character outside a string") != std::string::npos);
  CHECK_NOTHROW(lhpc::config::check_toml_text("[singularity]\npython = \"/opt/\xc3\x8c/python3\"\n", "site.toml"));
  // toml++ reads a bare value to its end (blank , ] } # or line end) before judging it: a quote or
  // a brace inside that run opens nothing, so non-ASCII after it is outside a string (fuzz, CI).
  CHECK(error_of("[rabbitmq]\namqp_url =0\"a={b='\xc3\x8c'}\n")
            .find("site.toml:2:19: non-ASCII character outside a string") != std::string::npos);
  CHECK(error_of("[rabbitmq]\namqp_url =0)\"\xc3\x8c\"\n").find("non-ASCII character outside a string") !=
        std::string::npos);
  auto dated =
      parse("[deploy]\nchunk_mib = 8 # caf\xc3\xa9 '\xc3\xa9'\n[singularity]\nbinds = [\"/\xc3\xa9\"]\n", "ok.toml");
  CHECK(dated.deploy.chunk_mib == 8);
  // toml++ asserts (when built with assertions) on '[' then a line end.
  CHECK(error_of("[\n").find("site.toml:1:2: a table header needs a name") != std::string::npos);
  CHECK(error_of("[[ \n").find("site.toml:1:4") != std::string::npos);
  CHECK(error_of("[ # x\n").find("a table header needs a name") != std::string::npos);
  // Bytes that are not UTF-8, NUL, and too many bytes.
  CHECK(error_of("[deploy]\n# \xff\n").find("site.toml:2:3: invalid UTF-8 (byte 0xFF)") != std::string::npos);
  CHECK(error_of("[deploy]\n# \xc0\xaf\n").find("invalid UTF-8") != std::string::npos);
  CHECK(error_of(std::string("[deploy]\0", 9)).find("NUL byte") != std::string::npos);
  CHECK(error_of(std::string(2 << 20, '#')).find("more than a configuration file may hold") != std::string::npos);
}

TEST_CASE("non-ASCII in strings and comments, and multi-line arrays, still parse") {
  auto c = parse(
      "# caf\xc3\xa9\n[singularity]\nsif_path = \"/tmp/caf\xc3\xa9\" # \xcc\xaa\n"
      "python = '''py\xc2\xa7'''\nbinds = [\n  \"/a\",\n  \"/b\",\n]\n",
      "ok.toml");
  CHECK(c.singularity.sif_path == "/tmp/caf\xc3\xa9");
  CHECK(c.singularity.python == "py\xc2\xa7");
  CHECK(c.singularity.binds.size() == 2);
  // A '[' at a line start inside a multi-line array is a value, not a header.
  CHECK(error_of("[singularity]\nbinds = [\n[\"x\"],\n]\n").find("wrong type") != std::string::npos);
}

// ---- issue 15: the user's Lithops config -----------------------------------------

namespace {

constexpr const char* k_lithops_yaml = R"(lithops:
  backend: singularity
  storage: minio
  log_level: WARNING
  data_limit: 4          # a key lithops-hpc does not read: left alone
singularity:
  sif_path: /scratch/%u/sif
  runtime: my-rt
  worker_processes: 8
rabbitmq:
  amqp_url: amqps://alice:Zq9xK@broker.example:5671/v
minio:
  endpoint: http://minio:9000
)";

std::string yaml_error(const std::string& yaml) {
  try {
    parse_lithops_yaml(yaml, "config.yaml");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    return std::string(e.what()) + " | " + e.hint();
  }
  FAIL("expected a config error for: " << yaml);
  return {};
}

std::vector<std::string> warnings_of(const Config& c, const ClientFacts& f) {
  std::vector<std::string> out;
  for (const auto& x : lint_client(c, f)) {
    if (x.level == Finding::Level::warning) {
      out.push_back(x.text);
    }
  }
  return out;
}

bool any_has(const std::vector<std::string>& v, const std::string& needle) {
  return std::any_of(v.begin(), v.end(), [&](const std::string& s) { return s.find(needle) != std::string::npos; });
}

}  // namespace

TEST_CASE("the Lithops YAML gives sif_path, runtime and amqp_url, with file:line") {
  auto c = parse_lithops_yaml(k_lithops_yaml, "/home/u/.lithops/config");
  CHECK(c.singularity.sif_path == "/scratch/%u/sif");
  CHECK(c.singularity.runtime == "my-rt");
  CHECK(c.rabbitmq.amqp_url == "amqps://alice:Zq9xK@broker.example:5671/v");
  CHECK(to_string(c.origin("singularity.runtime")) == "/home/u/.lithops/config:8");
  CHECK(to_string(c.origin("rabbitmq.amqp_url")) == "/home/u/.lithops/config:11");
  CHECK(to_string(c.origin("deploy.transfer")) == "default");
  // Calls per message for the client, slots per node for the workers: not mapped.
  CHECK(c.singularity.worker_processes == 0);
  CHECK(c.lithops.backend->text == "singularity");
  CHECK(image_path(c, Placeholders{"1", "n", "alice"}) == "/scratch/alice/sif/my-rt.sif");
}

TEST_CASE("malformed YAML and wrong types for keys we read are errors at file:line:col") {
  CHECK(yaml_error("singularity:\n  runtime: [a\n").find("config.yaml:") != std::string::npos);
  auto bad = yaml_error("lithops:\n  backend: singularity\n   x: : y\n");
  CHECK(bad.find("config.yaml:3:") != std::string::npos);
  CHECK(yaml_error("singularity:\n  runtime:\n    - a\n").find("config.yaml:3:5: singularity.runtime: wrong type") !=
        std::string::npos);
  auto num = yaml_error("singularity:\n  runtime: 311\n");
  CHECK(num.find("config.yaml:2:12") != std::string::npos);
  CHECK(num.find("got a number") != std::string::npos);
  CHECK(num.find("quotes") != std::string::npos);
  CHECK(yaml_error("singularity: 3\n").find("expected a mapping") != std::string::npos);
  CHECK(yaml_error("- a\n- b\n").find("must be a mapping") != std::string::npos);
  // Deep nesting is refused by yaml-cpp (0.7 bounds its recursion), not a crash.
  CHECK(yaml_error("singularity:\n  runtime: " + std::string(100000, '[') + std::string(100000, ']') + "\n")
            .find("config.yaml:") != std::string::npos);
  auto url = yaml_error("rabbitmq:\n  amqp_url: http://alice:Zq9xK@h/\n");
  CHECK(url.find("config.yaml:2: rabbitmq.amqp_url") != std::string::npos);
  CHECK(url.find("Zq9xK") == std::string::npos);
  // Quoted numbers are strings, and keys of other sections are Lithops' business.
  CHECK(parse_lithops_yaml("singularity:\n  runtime: '311'\naws:\n  x: [1, 2]\n", "c").singularity.runtime == "311");
  CHECK(parse_lithops_yaml("", "c").lithops.source == "c");
}

TEST_CASE("precedence: flag > AMQP_URL > lithops-hpc TOML > Lithops YAML > default") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  auto yaml = d.write("lithops.yaml", k_lithops_yaml);
  EnvGuard lcf("LITHOPS_CONFIG_FILE", yaml.c_str());
  auto toml = d.write("hpc.toml", "[singularity]\nsif_path = \"/fast/sif\"\n");
  {
    EnvGuard amqp("AMQP_URL", nullptr);
    auto c = load(toml);
    CHECK(c.singularity.sif_path == "/fast/sif");
    CHECK(to_string(c.origin("singularity.sif_path")) == toml + ":2");
    CHECK(c.singularity.runtime == "my-rt");
    CHECK(to_string(c.origin("singularity.runtime")) == yaml + ":8");
    CHECK(to_string(c.origin("rabbitmq.amqp_url")) == yaml + ":11");
    CHECK(to_string(c.origin("deploy.mode")) == "default");
  }
  EnvGuard amqp("AMQP_URL", "amqps://u:pw@envhost/");
  auto c = load(toml);
  CHECK(c.rabbitmq.amqp_url == "amqps://u:pw@envhost/");
  CHECK(to_string(c.origin("rabbitmq.amqp_url")) == "environment (AMQP_URL)");
  c.singularity.sif_path = "/flag";
  c.set_by_flag("singularity.sif_path", "--sif-path");
  CHECK(to_string(c.origin("singularity.sif_path")) == "flag --sif-path");
  auto shown = to_toml(c, true);
  CHECK(shown.find("sif_path = '/flag'  # from flag --sif-path") != std::string::npos);
  CHECK(shown.find("runtime = 'my-rt'  # from " + yaml + ":8") != std::string::npos);
  CHECK(shown.find("pw@") == std::string::npos);
  int hidden = -1;
  auto changed = to_toml(c, true, true, &hidden);
  CHECK(changed.find("sif_path = '/flag'  # from flag --sif-path") != std::string::npos);
  CHECK(changed.find("# from default") == std::string::npos);
  CHECK(changed.find("[health]") == std::string::npos);  // nothing set there
  CHECK(shown.find("[health]") != std::string::npos);
  const auto count = [](const std::string& s) { return std::count(s.begin(), s.end(), '\n'); };
  // Every key is either listed or counted; the section lines differ.
  CHECK(hidden > 20);
  CHECK(shown.find("# from default") != std::string::npos);
  CHECK(count(changed) < count(shown));
}

TEST_CASE("the Lithops config is looked up as Lithops does") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  CHECK(!find_lithops_config());
  std::filesystem::create_directories(d.file(".lithops"));
  d.write(".lithops/config", "singularity:\n  runtime: from-home\n");
  CHECK(find_lithops_config() == d.file(".lithops/config"));
  CHECK(load("").singularity.runtime == "from-home");
  auto other = d.write("other.yaml", "singularity:\n  runtime: from-env-file\n");
  {
    EnvGuard f("LITHOPS_CONFIG_FILE", other.c_str());
    CHECK(load("").singularity.runtime == "from-env-file");
    EnvGuard j("LITHOPS_CONFIG", R"({"singularity": {"runtime": "from-json"}})");
    auto c = load("");
    CHECK(c.singularity.runtime == "from-json");
    CHECK(c.lithops.source == "LITHOPS_CONFIG (environment)");
  }
  EnvGuard missing("LITHOPS_CONFIG_FILE", d.file("nope").c_str());
  auto c = load("");
  CHECK(c.singularity.runtime.empty());
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0].find("localhost mode") != std::string::npos);
}

TEST_CASE("a Lithops YAML holding a password that others can read is a warning") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  EnvGuard amqp("AMQP_URL", nullptr);
  auto open = d.write("open.yaml", "rabbitmq:\n  amqp_url: amqps://u:Zq9xK@broker/\n", 0644);
  EnvGuard f("LITHOPS_CONFIG_FILE", open.c_str());
  auto c = load("");
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0].find("chmod 600 " + open) != std::string::npos);
  CHECK(c.warnings[0].find("Zq9xK") == std::string::npos);
  ::chmod(open.c_str(), 0600);
  CHECK(load("").warnings.empty());
}

TEST_CASE("no runtime configured: the image path says where to set it") {
  Config c;
  try {
    image_path(c, Placeholders{"1", "n", "u"});
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    CHECK(e.hint().find("runtime: NAME") != std::string::npos);
  }
  c.singularity.runtime = "rt";
  c.singularity.sif_path = "/tmp/";
  CHECK(image_path(c, Placeholders{"1", "n", "u"}) == "/tmp/rt.sif");
}

// ---- issue 15: client-side checks ---------------------------------------------------

TEST_CASE("a sound client config raises no warning") {
  auto c = parse_lithops_yaml(k_lithops_yaml, "l.yaml");
  auto w = warnings_of(c, {.image = "/x/my-rt.sif", .client_python = "3.11", .image_python = "3.11"});
  CHECK(w.empty());
  auto all = lint_client(c, {.client_python = "3.11", .image_python = "3.11"});
  REQUIRE(all.size() == 1);  // the note on worker_processes
  CHECK(all[0].text.find("l.yaml:9: singularity.worker_processes = 8 is, for the Lithops client, calls per message") !=
        std::string::npos);
}

TEST_CASE("config check warns when a call may outlive the broker's consumer_timeout, when it knows that") {
  ClientFacts same{.image = "/x/my-rt.sif", .client_python = "3.11", .image_python = "3.11"};
  auto c = parse_lithops_yaml(k_lithops_yaml, "l.yaml");
  CHECK(!any_has(warnings_of(c, same), "consumer_timeout"));  // the broker's value unknown: no guess
  c.rabbitmq.consumer_timeout = 1800;
  CHECK(any_has(warnings_of(c, same),
                "lithops.execution_timeout is not set (Lithops' default: 1800 s) but the "
                "broker's consumer_timeout is 1800 s"));
  c.rabbitmq.consumer_timeout = 86400;
  CHECK(!any_has(warnings_of(c, same), "consumer_timeout"));
  auto long_calls = parse_lithops_yaml("lithops:\n  backend: singularity\n  execution_timeout: 7200\n", "m.yaml");
  long_calls.rabbitmq.consumer_timeout = 3600;
  CHECK(any_has(warnings_of(long_calls, same),
                "m.yaml:3: lithops.execution_timeout is 7200 s but the broker's "
                "consumer_timeout is 3600 s"));
}

TEST_CASE("client checks: default runtime, localhost storage, log level, backend") {
  ClientFacts same{.client_python = "3.11", .image_python = "3.11"};
  auto w = warnings_of(parse_lithops_yaml("lithops:\n  backend: singularity\n  storage: localhost\n"
                                          "rabbitmq:\n  amqp_url: amqps://u:p@h/\n",
                                          "l.yaml"),
                       same);
  CHECK(any_has(w, "l.yaml: singularity.runtime is not set, Lithops' default image name"));
  CHECK(any_has(w, "runs `singularity build` itself"));
  CHECK(any_has(w, "lithops-hpc runtime build NAME"));
  CHECK(any_has(w, "l.yaml:3: lithops.storage is 'localhost' with backend singularity: Lithops refuses it"));
  CHECK(any_has(w, "lithops.log_level is not set (Lithops' default: INFO)"));
  auto dbg = warnings_of(parse_lithops_yaml("lithops:\n  backend: aws_lambda\n  log_level: DEBUG\n"
                                            "singularity:\n  runtime: default\n",
                                            "l.yaml"),
                         same);
  CHECK(any_has(dbg, "l.yaml:2: lithops.backend is 'aws_lambda'"));
  CHECK(any_has(dbg, "l.yaml:3: lithops.log_level is DEBUG"));
  CHECK(any_has(dbg, "l.yaml:5: singularity.runtime is 'default'"));
  CHECK(any_has(dbg, "rabbitmq.amqp_url is not set"));
  CHECK(any_has(warnings_of(Config{}, same), "no Lithops config found"));
}

TEST_CASE("client checks: Python versions and broker URLs that differ") {
  auto c = parse_lithops_yaml(k_lithops_yaml, "l.yaml");
  auto py = warnings_of(c, {.image = "/x/my-rt.sif", .client_python = "3.12", .image_python = "3.11"});
  REQUIRE(py.size() == 1);
  CHECK(py[0].find("the client's Python is 3.12 but the image /x/my-rt.sif has Python 3.11") != std::string::npos);
  auto unknown = lint_client(c, {.image = "/x/my-rt.sif", .client_python = "3.12", .image_python_why = "no label"});
  CHECK(std::any_of(unknown.begin(), unknown.end(), [](const Finding& f) {
    return f.level == Finding::Level::note &&
           f.text.find("cannot tell the image's Python version: no label") != std::string::npos;
  }));

  c = parse("[rabbitmq]\namqp_url = \"amqps://alice:Other1@other.example/v\"\n", "hpc.toml", c);
  auto b = warnings_of(c, {.client_python = "3.11", .image_python = "3.11"});
  REQUIRE(b.size() == 1);
  CHECK(b[0].find("differs from the workers' amqps://alice:***@other.example/v (hpc.toml:2)") != std::string::npos);
  CHECK(b[0].find("Zq9xK") == std::string::npos);
  CHECK(b[0].find("Other1") == std::string::npos);

  c = parse("[rabbitmq]\nqueue = \"mine\"\n", "hpc2.toml", parse_lithops_yaml(k_lithops_yaml, "l.yaml"));
  CHECK(any_has(warnings_of(c, {.client_python = "3.11", .image_python = "3.11"}), "always publishes to 'task_queue'"));
}

TEST_CASE("the image's Python comes from its definition file") {
  CHECK(python_version_from_deffile("Bootstrap: docker\nFrom: python:3.12-slim-bookworm\n") == "3.12");
  CHECK(python_version_from_deffile("Bootstrap: docker\nFrom: python:3.12-slim\n%labels\n"
                                    "    org.lithops-hpc.python-version 3.11\n") == "3.11");
  CHECK(!python_version_from_deffile("Bootstrap: docker\nFrom: alpine:3.19\n"));
  TempDir d{"config"};
  lhpc::test::FixtureSpec spec;
  spec.deffile = "Bootstrap: docker\nFrom: python:3.11-slim-bookworm\n";
  lhpc::test::write_sif(d.file("rt.sif"), spec);
  std::string why;
  CHECK(image_python_version(d.file("rt.sif"), &why) == "3.11");
  lhpc::test::write_sif(d.file("alpine.sif"), lhpc::test::FixtureSpec{});
  CHECK(!image_python_version(d.file("alpine.sif"), &why));
  CHECK(why.find("no label org.lithops-hpc.python-version") != std::string::npos);
}

TEST_CASE("autoalloc.runtimes takes runtime names and refuses an image path, saying where") {
  TempDir d{"config"};
  NoLithopsConfig no_lithops{d};
  EnvGuard amqp("AMQP_URL", nullptr);
  auto good = d.write("good.toml", "[autoalloc]\nruntimes = [\"rt-b\", \"torch_2\"]\n");
  auto c = load(good);
  CHECK(c.autoalloc.runtimes == std::vector<std::string>{"rt-b", "torch_2"});
  auto bad = d.write("bad.toml", "[autoalloc]\nruntimes = [\"rt-b\", \"/x/rt.sif\"]\n");
  try {
    load(bad);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("autoalloc.runtimes") != std::string::npos);
  }
}
