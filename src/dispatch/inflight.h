// Which message a dispatcher is working on right now, kept in a file so that
// it outlives the process. A message whose processing kills the dispatcher (a
// parser or stack bug nobody has found yet) is unacked, so the broker hands
// it out again marked `redelivered`; the next dispatcher on this node finds it
// here and dead-letters it instead of dying on it too. A record whose process
// still runs (named <job>-<rank>-<pid>) is a message in progress, not a crash:
// the same message may reach a rank beside it, redelivered, at that moment
// (a reserve gives tasks back: dispatcher.h).
//
// One 33-byte file per dispatcher process under <state dir>/inflight/<node>/ (0700),
// rewritten with pwrite() and no fsync: the page cache outlives a crashed
// process. Node-local by design: a dispatcher on another node that gets the
// message first has no record of it (see lithops-hpc.toml(5), max_message_*).
#pragma once

#include <set>
#include <string>
#include <string_view>

#include "util/fd.h"

namespace lhpc::dispatch {

// What the dispatcher asks of the record; a fake in unit tests.
class CrashRecordPort {
public:
  virtual ~CrashRecordPort() = default;
  // Processing of `body` starts / ended without killing us.
  virtual void begin(std::string_view body) = 0;
  virtual void end() = 0;
  // A dispatcher on this node died while processing `body`.
  virtual bool killed_before(std::string_view body) = 0;
};

class InflightRecord final : public CrashRecordPort {
public:
  // Creates `dir` private (0700, ours, no symlink) and reads what earlier
  // dispatchers left there (removing records older than a week), then takes
  // <dir>/<name> as its own file.
  // Throws Error naming the path.
  InflightRecord(const std::string& dir, const std::string& name);
  // A clean end: its own file is removed (nothing of ours is in flight).
  ~InflightRecord() override;
  InflightRecord(const InflightRecord&) = delete;
  InflightRecord& operator=(const InflightRecord&) = delete;

  void begin(std::string_view body) override;
  void end() override;
  bool killed_before(std::string_view body) override;

  static std::string digest(std::string_view body);  // 32 hex digits (XXH3-128)

private:
  void load(bool others_only);
  void write(const std::string& text);

  std::string m_dir, m_name;
  UniqueFd m_fd;
  std::set<std::string> m_suspects;
};

}  // namespace lhpc::dispatch
