// Helpers shared by the unit test areas: a private temporary directory that
// goes away with its scope, and an environment variable set for a scope.
#pragma once

#include <sys/types.h>
#include <optional>
#include <string>

namespace lhpc::test {

class TempDir {
public:
  // $TMPDIR (or /tmp)/lhpc-test-<tag>-XXXXXX, mode 0700.
  explicit TempDir(const std::string& tag = "unit");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string path;
  const std::string& str() const { return path; }
  std::string file(const std::string& name) const { return path + "/" + name; }
  // Writes `text` to file(name) with `mode`; returns its path.
  std::string write(const std::string& name, const std::string& text, mode_t mode = 0600) const;
};

class EnvGuard {
public:
  EnvGuard(std::string name, const char* value);  // nullptr: unset for the scope
  EnvGuard(std::string name, const std::optional<std::string>& value);
  ~EnvGuard();
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

private:
  std::string m_name;
  std::optional<std::string> m_old;
};

}  // namespace lhpc::test
