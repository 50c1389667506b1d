// `runtime build` below the CLI (container/build.h): the checks that run
// before the engine, and what is left behind when the engine fails or is
// interrupted. The engine is a shell script standing for singularity build.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "container/build.h"
#include "test_support.h"
#include "util/error.h"
#include "util/fs.h"

using namespace lhpc;
using namespace lhpc::container;

namespace {

// `build` runs `sh -c SCRIPT sh OUT DEF`; everything else is unused here.
class ScriptEngine : public Engine {
public:
  explicit ScriptEngine(std::string script, config::Engine kind = config::Engine::singularity)
      : m_script(std::move(script)), m_kind(kind) {}
  config::Engine kind() const override { return m_kind; }
  std::string name() const override { return "script"; }
  std::string binary() const override { return "/bin/sh"; }
  std::vector<std::string> build_argv(const std::string& out, const std::string& def, bool, bool) const override {
    return {"sh", "-c", m_script, "sh", out, def};
  }
  std::vector<std::string> instance_start_argv(const InstanceSpec&) const override { return {}; }
  std::vector<std::string> instance_stop_argv(const std::string&, bool, int) const override { return {}; }
  std::vector<std::string> instance_list_argv(const std::string&) const override { return {}; }
  std::vector<std::string> exec_argv(const std::string&, const std::vector<std::string>& cmd) const override {
    return cmd;
  }
  std::vector<std::string> run_argv(const std::string&) const override { return {}; }
  EngineFeatures features() const override { return {}; }
  void set_version(const std::string&) override {}
  Env child_env(const Env& base, const std::map<std::string, std::string>&) const override { return base; }
  void start_instance(const InstanceSpec&) override {}
  bool instance_alive(const std::string&) override { return false; }
  void stop_instance(const std::string&, std::chrono::milliseconds) override {}

private:
  std::string m_script;
  config::Engine m_kind;
};

std::string read(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

Exit code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  FAIL("no lhpc::Error thrown");
  return Exit::ok;
}

struct Fixture {
  test::TempDir dir{"build"};
  std::string def = dir.write("rt.def", "Bootstrap: docker\nFrom: python:3.11-slim\n");
  BuildRequest request(const std::string& name = "rt") const {
    return {.name = name, .def = def, .dir = dir.path, .dir_origin = "--sif-path"};
  }
};

}  // namespace

TEST_CASE("runtime names are plain file names of at most 200 characters, without .sif") {
  for (const char* ok : {"rt", "lithops-default", "py3.11_x+1", "0"}) {
    CHECK_NOTHROW(check_runtime_name(ok));
  }
  for (const char* bad : {"", "-rt", ".rt", "a/b", "a b", "rt;rm", "rt.sif", "../rt"}) {
    CAPTURE(bad);
    CHECK(code_of([&] { check_runtime_name(bad); }) == Exit::usage);
  }
  CHECK_NOTHROW(check_runtime_name(std::string(200, 'a')));
  // Long input is refused by its length before the regex sees it (which
  // recurses per character), and the message does not repeat it whole.
  try {
    check_runtime_name(std::string(50'000, 'a'));
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::usage);
    CHECK(std::string(e.what()).find("50000 characters") != std::string::npos);
    CHECK(std::string(e.what()).size() < 200);
  }
}

TEST_CASE("the definition file must exist and be a readable regular file; it is made absolute") {
  Fixture f;
  CHECK(code_of([&] { resolve_definition(f.dir.file("nope.def")); }) == Exit::usage);
  CHECK(code_of([&] { resolve_definition(f.dir.path); }) == Exit::usage);
  CHECK(resolve_definition(f.def) == f.def);
  CHECK(resolve_definition(f.dir.path + "/./rt.def") == f.def);
}

TEST_CASE("the image directory must exist and be a directory") {
  Fixture f;
  CHECK_NOTHROW(check_image_dir(f.dir.path, "--sif-path"));
  CHECK(code_of([&] { check_image_dir(f.dir.file("missing"), "--sif-path"); }) == Exit::failure);
  CHECK(code_of([&] { check_image_dir(f.def, "--sif-path"); }) == Exit::failure);
}

TEST_CASE("a build that succeeds returns the image and its size") {
  Fixture f;
  ScriptEngine e("printf SIF_MAGIC > \"$1\"");
  auto built = build_image(e, f.request());
  CHECK(built.path == f.dir.file("rt.sif"));
  CHECK(built.bytes == 9);
}

TEST_CASE("an existing image is kept unless --force, and a failed --force build leaves it alone") {
  Fixture f;
  auto old = f.dir.write("rt.sif", "old image");
  ScriptEngine fails("exit 3");
  CHECK(code_of([&] { build_image(fails, f.request()); }) == Exit::failure);
  CHECK(read(old) == "old image");
  auto req = f.request();
  req.force = true;
  CHECK(code_of([&] { build_image(fails, req); }) == Exit::engine);
  CHECK(read(old) == "old image");  // the engine never touched it: not ours to remove
}

TEST_CASE("a failed build that wrote the image has the partial image removed") {
  Fixture f;
  ScriptEngine partial("printf half > \"$1\"; exit 3");
  try {
    build_image(partial, f.request());
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::engine);
    CHECK(std::string(e.what()).find("exited with code 3; removed the partial image") != std::string::npos);
    CHECK(e.hint().find("run it by hand") != std::string::npos);
  }
  CHECK_FALSE(path_exists(f.dir.file("rt.sif")));
}

TEST_CASE("success without an image is an engine error") {
  Fixture f;
  ScriptEngine nothing("true");
  CHECK(code_of([&] { build_image(nothing, f.request()); }) == Exit::engine);
}

TEST_CASE("an interrupted build passes the signal on, removes the partial image and exits 128+signal") {
  Fixture f;
  // The "engine" writes half an image, then interrupts us (its parent) as a
  // Ctrl-C would, and waits to be told.
  ScriptEngine interrupted("printf half > \"$1\"; kill -INT $PPID; sleep 30");
  try {
    build_image(interrupted, f.request());
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(static_cast<int>(e.code()) == 128 + SIGINT);
    CHECK(std::string(e.what()).find("interrupted by signal 2; removed the partial image") != std::string::npos);
  }
  CHECK_FALSE(path_exists(f.dir.file("rt.sif")));
}

TEST_CASE("the host engine cannot build, and says which configuration chose it") {
  Fixture f;
  ScriptEngine host("true", config::Engine::host);
  auto req = f.request();
  req.config_source = "/etc/x.toml";
  try {
    build_image(host, req);
    FAIL("accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Exit::config);
    CHECK(std::string(e.what()).find("host engine (singularity.engine = \"host\" in /etc/x.toml)") !=
          std::string::npos);
  }
}

TEST_CASE("every check runs before the engine") {
  Fixture f;
  ScriptEngine marks("touch \"$1.ran\"");
  auto req = f.request();
  req.def = f.dir.file("missing.def");
  CHECK(code_of([&] { build_image(marks, req); }) == Exit::usage);
  req = f.request("bad/name");
  CHECK(code_of([&] { build_image(marks, req); }) == Exit::usage);
  req = f.request();
  req.dir = f.dir.file("missing");
  CHECK(code_of([&] { build_image(marks, req); }) == Exit::failure);
  CHECK_FALSE(path_exists(f.dir.file("rt.sif.ran")));
}

TEST_CASE("runtime build's labels go at the end of the definition's first %labels section, or in one of their own") {
  std::vector<std::pair<std::string, std::string>> gpu{{"org.lithops-hpc.gpus-per-slot", "2"},
                                                       {"org.lithops-hpc.gpu-vendor", "amd"}};
  CHECK(with_labels("Bootstrap: docker\nFrom: x\n%labels\n    a 1\n\n%help\n    h\n", gpu) ==
        "Bootstrap: docker\nFrom: x\n%labels\n    a 1\n\n    org.lithops-hpc.gpus-per-slot 2\n"
        "    org.lithops-hpc.gpu-vendor amd\n%help\n    h\n");
  CHECK(with_labels("Bootstrap: docker\nFrom: x\n%labels\n    a 1", gpu) ==
        "Bootstrap: docker\nFrom: x\n%labels\n    a 1\n    org.lithops-hpc.gpus-per-slot 2\n"
        "    org.lithops-hpc.gpu-vendor amd\n");
  CHECK(with_labels("Bootstrap: docker\nFrom: x\n", {{"k", "v"}}) ==
        "Bootstrap: docker\nFrom: x\n\n%labels\n    k v\n");
  CHECK(code_of([] { with_labels("", {{"a b", "1"}}); }) == Exit::usage);
  CHECK(code_of([] { with_labels("", {{"a", "1\n%post"}}); }) == Exit::usage);
}

TEST_CASE("a build with labels builds from a labelled copy of the definition, removed afterwards") {
  Fixture f;
  // The "engine" keeps the definition it was given as the image.
  ScriptEngine e("cp \"$2\" \"$1\"");
  auto req = f.request();
  req.labels = {{"org.lithops-hpc.gpus-per-slot", "1"}};
  auto built = build_image(e, req);
  CHECK(read(built.path) ==
        "Bootstrap: docker\nFrom: python:3.11-slim\n\n%labels\n    org.lithops-hpc.gpus-per-slot 1\n");
  CHECK(read(f.def) == "Bootstrap: docker\nFrom: python:3.11-slim\n");  // the user's file is untouched
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(f.dir.path)) {
    left.push_back(e.path().filename().string());
  }
  std::sort(left.begin(), left.end());
  CHECK(left == std::vector<std::string>{"rt.def", "rt.sif"});
}
