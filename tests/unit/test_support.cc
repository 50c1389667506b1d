#include "test_support.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "util/process.h"

namespace lhpc::test {

TempDir::TempDir(const std::string& tag) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/lhpc-test-" + tag + "-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) {
    throw std::runtime_error("mkdtemp " + tmpl + " failed");
  }
  path = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

std::string TempDir::write(const std::string& name, const std::string& text, mode_t mode) const {
  auto p = file(name);
  std::ofstream(p) << text;
  ::chmod(p.c_str(), mode);
  return p;
}

EnvGuard::EnvGuard(std::string name, const char* value)
    : EnvGuard(std::move(name), value != nullptr ? std::optional<std::string>(value) : std::nullopt) {}

EnvGuard::EnvGuard(std::string name, const std::optional<std::string>& value) : m_name(std::move(name)) {
  if (const char* old = std::getenv(m_name.c_str())) {
    m_old = old;
  }
  if (value) {
    ::setenv(m_name.c_str(), value->c_str(), 1);
  } else {
    ::unsetenv(m_name.c_str());
  }
}

EnvGuard::~EnvGuard() {
  if (m_old) {
    ::setenv(m_name.c_str(), m_old->c_str(), 1);
  } else {
    ::unsetenv(m_name.c_str());
  }
}

bool as_nobody(const std::vector<std::string>& argv) {
  std::vector<std::string> full = {"setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"};
  full.insert(full.end(), argv.begin(), argv.end());
  auto child = spawn({.argv = full});
  int status = child.wait();
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

SharedDir::SharedDir(const std::string& tag) : TempDir(tag) {
  if (::chmod(path.c_str(), 01777) != 0) {
    throw std::runtime_error("chmod 1777 " + path + " failed");
  }
}

CwdGuard::CwdGuard(const std::string& dir) : m_old(std::filesystem::current_path().string()) {
  std::filesystem::current_path(dir);
}

CwdGuard::~CwdGuard() {
  std::error_code ec;
  std::filesystem::current_path(m_old, ec);
}

}  // namespace lhpc::test
