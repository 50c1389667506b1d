// Helpers shared by the unit test areas: a private temporary directory that
// goes away with its scope, an environment variable or the current directory
// set for a scope, and the other user of the security tests.
#pragma once

#include <sys/types.h>
#include <optional>
#include <string>
#include <vector>

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

// The attacker of the security tests is another local user: runs `argv` as
// nobody (setpriv --reuid=nobody --regid=nogroup --clear-groups, as the
// integration tests do); true when it exited 0. The suite runs as root.
bool as_nobody(const std::vector<std::string>& argv);
inline constexpr uid_t k_nobody = 65534;

// A TempDir that every user may write in, sticky like /tmp (mode 1777):
// where another user plants files and links next to ours.
struct SharedDir : TempDir {
  explicit SharedDir(const std::string& tag);
};

class CwdGuard {
public:
  explicit CwdGuard(const std::string& dir);  // chdir for the scope
  ~CwdGuard();
  CwdGuard(const CwdGuard&) = delete;
  CwdGuard& operator=(const CwdGuard&) = delete;

private:
  std::string m_old;
};

}  // namespace lhpc::test
