// Connecting to the broker without stalling an event loop. rabbitmq-c blocks
// while it connects (TCP, TLS, login, declarations: up to Options::timeout
// each against a silent host), so each attempt runs on a helper thread this
// object owns and joins; the loop only asks whether the attempt is over. The
// attempts are spaced by a capped exponential Backoff, reset once connected.
//
//   Reconnector rc(opts, setup);        // setup: declarations, qos, consume
//   if (rc.due(now)) rc.start();        // a new attempt on the helper thread
//   if (auto r = rc.take()) ...         // finished: r->conn, or r->error and r->retry_in
//   rc.lost(now);                       // the connection broke: next attempt after the backoff
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "amqp/connection.h"
#include "util/backoff.h"

namespace lhpc::amqp {

class Reconnector {
public:
  using Clock = std::chrono::steady_clock;
  // Runs on the helper thread right after the connection opened (declare,
  // qos, consume): touches nothing but the connection it is given. Returns
  // the consumer tag (or empty). Throws Error to fail the attempt.
  using Setup = std::function<std::string(Connection&)>;

  struct Result {
    std::unique_ptr<Connection> conn;  // null: the attempt failed
    std::string consumer_tag;
    std::string error;                      // why it failed (URL redacted)
    std::chrono::milliseconds retry_in{0};  // failed: the next attempt is due after this
  };

  Reconnector(Options opts, Backoff backoff = Backoff());
  // Joins an attempt still running: bounded by the attempt's own timeouts.
  ~Reconnector();
  Reconnector(const Reconnector&) = delete;
  Reconnector& operator=(const Reconnector&) = delete;

  // No attempt runs and the backoff delay has passed.
  bool due(Clock::time_point now) const { return !m_thread.joinable() && now >= m_next_attempt; }
  bool connecting() const { return m_thread.joinable(); }
  Clock::time_point next_attempt() const { return m_next_attempt; }

  // Starts one attempt on the helper thread; `setup` runs there once connected.
  void start(Setup setup);
  // The finished attempt's outcome, once; nullopt while it still runs (or
  // none ran). A success resets the backoff; a failure schedules the next try.
  std::optional<Result> take();
  // A connection this object made broke: the next attempt waits the backoff.
  std::chrono::milliseconds lost(Clock::time_point now = Clock::now());

private:
  struct Outcome {
    bool done = false;
    std::unique_ptr<Connection> conn;
    std::string consumer_tag;
    std::string error;
  };
  Options m_opts;
  Backoff m_backoff;
  Clock::time_point m_next_attempt{};
  std::mutex m_mu;
  Outcome m_outcome;  // guarded by m_mu
  std::thread m_thread;
};

}  // namespace lhpc::amqp
