// Catches what a rank's handler processes write to stderr (Lithops' logging,
// what functions print) and writes it to the rank's log file, so the job
// output keeps only lithops-hpc's own lines. Every handler gets the write
// end of one pipe as its stderr; a thread of ours reads the other end and
// appends whole lines to a RotatingFile. A thread, not the rank's event
// loop: a slow disk (NFS home in `state` mode) then never delays a task, and
// the pipe is read while the loop blocks (stopping handlers). Lines up to
// PIPE_BUF bytes from different handlers never mix.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "logs/rotating_file.h"
#include "util/fd.h"

namespace lhpc::logs {

class Capture {
public:
  // Opens the file `name` in `dir` (taken over) and starts the thread.
  // Throws Error (see RotatingFile) when the file cannot be used.
  Capture(UniqueFd dir, const std::string& name, std::string shown, std::uint64_t max_bytes);
  ~Capture();
  Capture(const Capture&) = delete;
  Capture& operator=(const Capture&) = delete;

  // What children get as stderr (close-on-exec here; spawn dups it).
  int write_fd() const noexcept { return m_write.get(); }
  const std::string& path() const noexcept { return m_shown; }

  // Everything written to the pipe before this call is in the file when it
  // returns (or `limit` passed).
  void sync(std::chrono::milliseconds limit = std::chrono::milliseconds(500));
  // The last lines written (at most k_tail), for an error message.
  std::vector<std::string> tail() const;
  static constexpr std::size_t k_tail = 20;

  // Reads what is in the pipe, then stops the thread; idempotent.
  void close();

private:
  void run();
  bool read_available();  // false at EOF
  void feed(const char* data, std::size_t n);
  void flush_partial();
  void wake();

  std::string m_shown;
  RotatingFile m_file;
  UniqueFd m_dir, m_read, m_write, m_wake;
  std::string m_partial;
  mutable std::mutex m_mu;
  std::condition_variable m_cv;
  std::deque<std::string> m_tail;
  std::uint64_t m_sync_asked = 0, m_sync_done = 0;
  bool m_closing = false;
  bool m_warned = false;
  std::thread m_thread;
};

}  // namespace lhpc::logs
