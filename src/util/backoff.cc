#include "util/backoff.h"

#include <algorithm>

namespace lhpc {

Backoff::Backoff(std::chrono::milliseconds first, std::chrono::milliseconds cap)
    : m_first(std::max(first, std::chrono::milliseconds(0))), m_cap(std::max(cap, m_first)), m_next(m_first) {}

std::chrono::milliseconds Backoff::next() {
  auto now = m_next;
  m_next = std::min(m_cap, m_next * 2);
  ++m_attempts;
  return now;
}

void Backoff::reset() {
  m_next = m_first;
  m_attempts = 0;
}

FailureWindow::FailureWindow(int limit, std::chrono::milliseconds window)
    : m_limit(std::max(limit, 0)), m_window(window) {}

void FailureWindow::forget_before(Clock::time_point now) {
  while (!m_times.empty() && now - m_times.front() >= m_window) {
    m_times.pop_front();
  }
}

int FailureWindow::record(Clock::time_point now) {
  forget_before(now);
  m_times.push_back(now);
  return static_cast<int>(m_times.size());
}

int FailureWindow::count(Clock::time_point now) {
  forget_before(now);
  return static_cast<int>(m_times.size());
}

}  // namespace lhpc
