// The warm handler processes: K slot handlers plus one control handler, each
// a long-lived child (`ENGINE exec instance://NAME python3 handler.py`)
// speaking JSON lines on non-blocking pipes (runtime-defs/handler.py has the
// protocol). The pool spawns, feeds, reads and restarts them; what the lines
// mean is the dispatcher's business. Every death, before or after the ready
// line, is counted in a time window and the restart waits a capped
// exponential backoff: a handler that dies as soon as it is up is restarted
// a few times, ever more slowly, then the pool fails. With `retire_slots`
// (a GPU runtime, whose slots own different devices) a slot handler past
// that limit is taken out of service alone and the others go on; the pool
// fails only when its control handler does or no slot is left.
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "dispatch/dispatcher.h"
#include "util/backoff.h"
#include "util/process.h"

namespace lhpc::dispatch {

struct HandlerCommand {
  std::vector<std::string> argv;
  Env env;
  int stderr_fd = -1;  // -1: ours (the job output); else e.g. the rank's handler log (logs/)
};

struct PoolOptions {
  // From spawn to the "ready" line (a container exec plus importing Lithops).
  std::chrono::milliseconds ready_timeout{120000};
  // Deaths of one handler within death_window (before or after its ready
  // line, idle or busy) tolerated; one more and the pool fails.
  int restart_limit = 5;
  std::chrono::milliseconds death_window{60000};
  std::chrono::milliseconds backoff_first{500};
  std::chrono::milliseconds backoff_max{30000};
  // A slot handler (every one but the last, the control handler) past
  // restart_limit is taken out of service instead of failing the pool.
  bool retire_slots = false;
};

class HandlerPool final : public HandlerPort {
public:
  using Clock = std::chrono::steady_clock;

  class Listener {
  public:
    virtual ~Listener() = default;
    virtual void handler_ready(int h, const Json& info) = 0;
    virtual void handler_reply(int h, const Json& reply) = 0;
    virtual void handler_lost(int h, const std::string& why) = 0;
    // It died before it was ready (the pool retries with backoff): a hint
    // that the instance it runs in may be gone.
    virtual void handler_failed_to_start(int /*h*/) {}
    // Slot h died past the limit and is not restarted again (retire_slots).
    virtual void handler_retired(int /*h*/, const std::string& /*why*/) {}
  };

  HandlerPool(int count, std::function<HandlerCommand(int h)> command, PoolOptions opts, Listener& listener);
  ~HandlerPool() override;
  HandlerPool(const HandlerPool&) = delete;
  HandlerPool& operator=(const HandlerPool&) = delete;

  void start();
  // HandlerPort: queue a line for handler h (written as the pipe takes it).
  void send(int h, const std::string& line) override;

  // Event-loop integration: append this pool's descriptors; hand back the
  // ones poll() flagged (`tag` is what add_pollfds stored beside each).
  void add_pollfds(std::vector<pollfd>& fds, std::vector<int>& tags) const;
  void handle(int tag, short revents);
  // Restarts that are due, ready timeouts, losses noticed while writing.
  void tick(Clock::time_point now = Clock::now());
  // While held, no handler is (re)started: what it would run in is down.
  void hold_restarts(bool hold) { m_hold = hold; }
  std::optional<Clock::time_point> next_deadline() const;

  // EOF to every handler, then SIGTERM and SIGKILL after `grace`.
  void stop(std::chrono::milliseconds grace);

  int size() const { return static_cast<int>(m_procs.size()); }
  bool failed() const { return m_failed; }
  const std::string& last_error() const { return m_last_error; }
  int restarts() const { return m_restarts; }
  pid_t pid(int h) const;
  bool ready(int h) const;
  int ready_count() const;
  // Why slot h was taken out of service; empty while it is in service.
  const std::string& retired_why(int h) const;

private:
  enum class State { down, starting, ready, failed };
  struct Proc {
    Child child;
    State state = State::down;
    std::string to_write;
    std::size_t written = 0;
    std::string partial;  // bytes of an unfinished line
    Clock::time_point started{};
    Clock::time_point restart_at{};
    Backoff backoff;
    FailureWindow deaths{5, std::chrono::milliseconds(60000)};
    bool was_started = false;
    std::string lost_why;     // set: lost, to be reported by tick()
    std::string retired_why;  // set: out of service for good (retire_slots)
  };

  void spawn_one(int h, Clock::time_point now);
  void read_from(int h);
  void flush(int h);
  void lose(int h, const std::string& why);
  // Counts a death; schedules the restart, or fails the pool past the limit.
  void record_death(int h, Clock::time_point now, const std::string& detail);
  // Past the limit: slot h out of service (retire_slots), or the pool failed.
  void give_up(int h, int deaths, const std::string& detail);
  void report_losses(Clock::time_point now);
  void on_line(int h, const std::string& line);

  std::function<HandlerCommand(int h)> m_command;
  PoolOptions m_opts;
  Listener& m_listener;
  std::vector<Proc> m_procs;
  bool m_stopping = false;
  bool m_hold = false;
  bool m_failed = false;
  std::string m_last_error;
  int m_restarts = 0;
};

}  // namespace lhpc::dispatch
