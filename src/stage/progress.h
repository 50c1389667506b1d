// Progress of a transfer as people read it: on a terminal one line redrawn in
// place (bytes, MB/s, ETA); in batch logs a log line every few seconds, so a
// job's output shows that a long stage is alive without thousands of lines.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace lhpc::stage {

// "850 MB/s" (decimal megabytes, like dd and sbcast), "0 MB/s" for no time.
std::string rate_text(double bytes, double seconds);
// "0:07", "12:30", "1:02:03"; "?" when unknown.
std::string eta_text(double seconds);
// "512.0 MiB / 1.0 GiB (50%), 850 MB/s, ETA 0:01"
std::string progress_text(std::uint64_t done, std::uint64_t total, double seconds);

class Progress {
public:
  using Clock = std::chrono::steady_clock;
  // tty: redraw a line on stderr; otherwise log every `log_every`.
  Progress(std::uint64_t total, bool tty, std::chrono::milliseconds log_every = std::chrono::seconds(5));
  void update(std::uint64_t done);
  void finish();  // ends the terminal line
  double seconds() const;

private:
  std::uint64_t m_total;
  bool m_tty;
  std::chrono::milliseconds m_every;
  Clock::time_point m_start, m_last;
  bool m_drawn = false;
};

}  // namespace lhpc::stage
