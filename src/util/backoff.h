// One retry policy for everything that restarts on its own: broker
// reconnects, handler, runscript and instance restarts. Before it each had its
// own arithmetic, and one (the instance) had none: a crash loop ran at full
// speed. `Backoff` spaces the attempts; `FailureWindow` decides when a thing
// that keeps dying is broken for good, whatever state it died in.
#pragma once

#include <chrono>
#include <deque>

namespace lhpc {

// Capped exponential: first, 2*first, 4*first ... cap; reset() after success.
// No jitter: the delays are documented and logged, and the ranks of one
// deployment are already spread in time by their own start-up.
class Backoff {
public:
  explicit Backoff(std::chrono::milliseconds first = std::chrono::milliseconds(500),
                   std::chrono::milliseconds cap = std::chrono::milliseconds(30000));
  // The delay to wait now; the following one doubles, up to the cap.
  std::chrono::milliseconds next();
  void reset();
  // next() calls since construction or the last reset().
  int attempts() const { return m_attempts; }

private:
  std::chrono::milliseconds m_first, m_cap, m_next;
  int m_attempts = 0;
};

// Failures in a sliding time window: `limit` of them are tolerated, one more
// within `window` is final. A thing that stayed up longer than the window
// starts again with a clean slate.
class FailureWindow {
public:
  using Clock = std::chrono::steady_clock;
  FailureWindow(int limit, std::chrono::milliseconds window);
  // Records one failure at `now`; returns how many fall within the window.
  int record(Clock::time_point now);
  // The failures recorded within the window ending at `now`.
  int count(Clock::time_point now);
  bool exceeded(Clock::time_point now) { return count(now) > m_limit; }
  int limit() const { return m_limit; }
  std::chrono::milliseconds window() const { return m_window; }

private:
  void forget_before(Clock::time_point now);
  int m_limit;
  std::chrono::milliseconds m_window;
  std::deque<Clock::time_point> m_times;
};

}  // namespace lhpc
