// One rank's handler log on disk, capped in size: past `max_bytes` the file
// is renamed to <name>.1 (replacing the previous .1) and a new one started,
// so a rank never holds more than twice the cap. Everything goes through
// the directory's fd, and the file is opened without following a symlink:
// the directory is private (place.h), this is the second fence.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "util/fd.h"

namespace lhpc::logs {

class RotatingFile {
public:
  // Opens (creates, 0600) `name` in `dir_fd` for appending; throws Error
  // naming `shown` when it is a symlink, not a regular file of ours, or
  // cannot be opened.
  RotatingFile(int dir_fd, std::string name, std::string shown, std::uint64_t max_bytes);

  // Appends whole lines (the last may lack its '\n'); a line longer than the
  // cap is cut to it. Returns false when a write failed (disk full ...):
  // those bytes are dropped, error() says why.
  bool append(std::string_view text);

  std::uint64_t size() const noexcept { return m_size; }
  std::uint64_t rotations() const noexcept { return m_rotations; }
  const std::string& error() const noexcept { return m_error; }
  const std::string& shown() const noexcept { return m_shown; }

private:
  void open();
  void rotate();
  bool write_out(const std::string& data);

  int m_dir;
  std::string m_name, m_shown;
  std::uint64_t m_max;
  UniqueFd m_fd;
  std::uint64_t m_size = 0;
  std::uint64_t m_rotations = 0;
  std::string m_error;
};

// Opens `name` in `dir_fd` for reading: no symlink followed, a regular file
// of ours; an invalid fd when it does not exist. Throws Error naming `shown`.
UniqueFd open_log_for_reading(int dir_fd, const std::string& name, const std::string& shown);

}  // namespace lhpc::logs
