#include "stage/progress.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <cstdio>

#include "util/strings.h"

namespace lhpc::stage {

std::string rate_text(double bytes, double seconds) {
  double mbs = seconds > 0 ? bytes / seconds / 1e6 : 0;
  char buf[32];
  std::snprintf(buf, sizeof buf, mbs >= 100 || mbs == 0 ? "%.0f MB/s" : "%.1f MB/s", mbs);
  return buf;
}

std::string eta_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) {
    return "?";
  }
  auto s = static_cast<long long>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%lld:%02lld", s / 60, s % 60);
  }
  return buf;
}

std::string progress_text(std::uint64_t done, std::uint64_t total, double seconds) {
  int pct = total == 0 ? 100 : static_cast<int>(static_cast<double>(done) * 100.0 / static_cast<double>(total));
  double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0;
  double eta = rate > 0 ? static_cast<double>(total - done) / rate : -1;
  return human_bytes(static_cast<double>(done)) + " / " + human_bytes(static_cast<double>(total)) + " (" +
         std::to_string(pct) + "%), " + rate_text(static_cast<double>(done), seconds) + ", ETA " + eta_text(eta);
}

Progress::Progress(std::uint64_t total, bool tty, std::chrono::milliseconds log_every)
    : m_total(total), m_tty(tty), m_every(log_every), m_start(Clock::now()), m_last(m_start) {}

double Progress::seconds() const { return std::chrono::duration<double>(Clock::now() - m_start).count(); }

void Progress::update(std::uint64_t done) {
  auto now = Clock::now();
  auto since = now - m_last;
  if (m_tty) {
    // ~5 redraws a second: enough to look alive, cheap on a slow terminal.
    if (since < std::chrono::milliseconds(200) && done < m_total) {
      return;
    }
    std::fprintf(stderr, "\rstaging %s\x1b[K", progress_text(done, m_total, seconds()).c_str());
    std::fflush(stderr);
    m_drawn = true;
  } else {
    if (since < m_every) {
      return;
    }
    spdlog::info("staging: {}", progress_text(done, m_total, seconds()));
  }
  m_last = now;
}

void Progress::finish() {
  if (m_tty && m_drawn) {
    std::fputs("\n", stderr);
    std::fflush(stderr);
    m_drawn = false;
  }
}

}  // namespace lhpc::stage
