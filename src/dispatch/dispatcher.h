// The dispatcher: the state machine between the broker and the handler
// processes, driven by events from the worker's event loop. It never does I/O
// itself: it talks to the broker and to handlers through two small ports, so
// unit tests drive it with fakes.
//
// Rules it keeps (docs/design.md, "Failure semantics"):
// - a message is acked only after every call it kept has finished (success,
//   or a failure the handler reported); never nack-and-sleep;
// - a send_task with more calls than free slots keeps what fits and
//   republishes the rest (persistent, confirmed) before its calls start;
// - the prefetch (basic.qos, per channel, changed as it goes) is free slots +
//   messages held that need an ack + one reserve (prefetch_for). A task that
//   arrives with no slot free waits here in the reserve (never republished,
//   never rotated) and starts the moment a slot frees, with no broker round
//   trip; once the reserve is taken, a rank whose slots are all busy receives
//   nothing and causes no broker traffic, and the queue's order is kept but
//   for that one message;
// - a task that has waited in the reserve for reserve_patience is given back
//   (basic.reject, requeue: to its place at the head of the queue), once per
//   message and rank: the broker hands it to an idle rank's slot consumer if
//   there is one (the end of a map: no call waits a whole task's length
//   behind a busy rank while a slot idles elsewhere), else back into a
//   reserve; a rank keeps a message it gave back before until it starts it,
//   so nothing bounces between busy ranks for longer than one patience per
//   rank, and with every slot busy the broker is soon as quiet as before;
// - a control message (get_metadata, ping) arriving in the reserve runs at
//   once on the control handler and then counts as held, which frees the
//   reserve again: with every slot busy and the reserve free, get_metadata is
//   answered without waiting for a slot. One queued behind more tasks than
//   the busy ranks' reserves hold is reached as slots free (the queue is FIFO);
// - two consumers share the channel: the reserve (x-priority 0, always) and
//   the slot consumer (higher x-priority, only while a slot is free:
//   set_slot_consumer), so the broker hands a task to an idle rank's slot
//   before a busy rank's reserve;
// - `lithops-hpc ping` reaches each rank through its own no-ack queue
//   (DispatcherOptions::rank_queue), consumed on a channel of its own without
//   a prefetch limit: a rank answers whatever its slots and reserve hold;
// - messages are bounded (Limits) before they are parsed: over either limit,
//   or malformed, they go to <queue>.dead with the reason, then are acked;
// - a message is recorded (CrashRecordPort) while it is processed; one that
//   comes back redelivered after killing a dispatcher on this node is
//   dead-lettered, never processed again here;
// - a call whose handler dies is republished with x-lithops-hpc-crashes + 1;
//   at the second crash it goes to <queue>.dead instead;
// - after a broker reconnect, messages of the old connection are the
//   broker's again (it redelivers them): calls still running finish but are
//   not acked (at-least-once: such a call may run twice; each one that
//   finishes so is counted in Counters::duplicates);
// - a message whose body is over max_message_bytes arrives without it
//   (amqp::Delivery::oversized, never buffered) and goes to <queue>.dead with
//   its headers only;
// - when the broker closes the channel because a delivery was not acked
//   within its consumer_timeout (on_consumer_timeout), the messages running
//   that long are noted; one redelivered after max_timeouts such closes goes
//   to <queue>.dead instead of running yet again;
// - a deployment serves one runtime (DispatcherOptions::runtime; runtime.h):
//   it never runs a send_task nor answers a get_metadata of another. A task
//   for runtime R is published (persistent, confirmed) to R's durable queue
//   <queue>.runtime.R, declared first, and acked once the broker confirmed
//   the copy (a refused copy: the original is requeued, never lost); a
//   get_metadata that is not its own names no runtime it could read, so it is
//   published to the fanout exchange <queue>.runtimes, which leaves a copy in
//   every runtime's queue, and acked likewise; a copy that arrives through
//   that exchange and is not its own is acked and dropped. Messages that
//   name no runtime run anywhere. A runtime name that is not a valid one
//   (config::runtime_name_problem) is dead-lettered;
// - when the declare-ok of a runtime queue a task was moved to says nobody
//   consumes it, the rank publishes a notice (runtime.h wanted_exchange: an
//   empty body, the runtime in a header) so that the autoalloc controller
//   learns the runtime and answers its tasks when it has no image; once per
//   runtime per k_wanted_notice_interval_s. A delivery carrying that header
//   is acked and dropped, never parsed.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "amqp/connection.h"
#include "dispatch/inflight.h"
#include "dispatch/protocol.h"
#include "lhpc_build_config.h"

namespace lhpc::dispatch {

// What the dispatcher asks of the broker connection. Implementations never
// throw: a failure shows up later as on_disconnected().
class BrokerPort {
public:
  virtual ~BrokerPort() = default;
  virtual void ack(std::uint64_t tag) = 0;
  virtual void reject(std::uint64_t tag, bool requeue) = 0;
  // Through the default exchange; returns the publisher-confirm sequence number.
  virtual std::uint64_t publish(const std::string& routing_key, const std::string& body,
                                const amqp::Properties& props) = 0;
  // Through a named exchange (the runtimes' fanout), with the routing key "".
  virtual std::uint64_t publish_to_exchange(const std::string& exchange, const std::string& body,
                                            const amqp::Properties& props) = 0;
  // Declare a durable queue (no arguments) without waiting for the reply:
  // sent before a publish on the same channel, it takes effect first. Its
  // declare-ok comes back later, through Dispatcher::on_declared.
  virtual void declare_queue(const std::string& name) = 0;
  // Declare a durable fanout exchange, without waiting for the reply.
  virtual void declare_exchange(const std::string& name) = 0;
  virtual void set_prefetch(int count) = 0;
  // Start (true) or cancel (false) the slot consumer: the one at the higher
  // x-priority, beside the reserve consumer that always runs.
  virtual void set_slot_consumer(bool active) = 0;
  virtual void stop_consuming() = 0;
};

// What it asks of the handler processes: deliver one request line. Never
// throws and never calls back into the dispatcher: a handler that cannot take
// the line is reported lost from the event loop afterwards.
class HandlerPort {
public:
  virtual ~HandlerPort() = default;
  virtual void send(int handler, const std::string& line) = 0;
};

struct Counters {
  std::uint64_t tasks_done = 0;         // calls a handler ran (function errors included)
  std::uint64_t tasks_failed = 0;       // calls a handler could not run (ok:false)
  std::uint64_t tasks_requeued = 0;     // calls republished after a crash, messages given back on drain
  std::uint64_t dead_lettered = 0;      // messages and calls moved to <queue>.dead
  std::uint64_t splits = 0;             // messages split because fewer slots were free
  std::uint64_t handler_crashes = 0;    // handlers lost while running something
  std::uint64_t metadata = 0;           // get_metadata answered
  std::uint64_t pings = 0;              // pings answered
  std::uint64_t duplicates = 0;         // calls finished after their message went back to the broker
  std::uint64_t consumer_timeouts = 0;  // channels the broker closed for an unacked delivery
  std::uint64_t moved = 0;              // messages moved to another runtime's queue (or its fanout)
  std::uint64_t returned = 0;           // tasks given back from the reserve (reserve_patience)
};

struct DispatcherOptions {
  int slots = 1;
  std::string queue = "task_queue";
  int rank = 0;
  std::string node;
  int max_crashes = 2;   // a call that crashed a handler this often is dead-lettered
  int max_timeouts = 2;  // a message that outlived the broker's consumer_timeout this often is dead-lettered
  Limits limits;         // [rabbitmq] max_message_bytes, max_message_depth
  // This rank's own queue (protocol.h rank_queue), consumed without acks:
  // what arrives through it is never acked, rejected or requeued. Empty: none.
  std::string rank_queue;
  // The runtime this deployment serves (runtime.h); empty: every runtime.
  std::string runtime;
  // The memory this rank has (MiB: its share of util/memory_limit's
  // job_memory_mb); 0: unknown. A send_task's runtime_memory caps the slots
  // in use at memory_mb / runtime_memory (the latest task's value); one that
  // needs more than memory_mb is dead-lettered with the reason.
  std::uint64_t memory_mb = 0;
  // How long a task waits in the reserve before it is given back (once).
  std::chrono::milliseconds reserve_patience = k_reserve_patience;
};

class Dispatcher {
public:
  using Clock = std::chrono::steady_clock;

  // `record`: where messages in flight are noted (nullptr: nowhere).
  Dispatcher(DispatcherOptions opts, BrokerPort& broker, HandlerPort& handlers, CrashRecordPort* record = nullptr);

  // Handler indices: 0..slots-1 run tasks, control() runs get_metadata and ping.
  int control() const { return m_opts.slots; }
  int handlers() const { return m_opts.slots + 1; }
  std::string dead_queue() const { return m_opts.queue + ".dead"; }

  // --- events -------------------------------------------------------------
  // A (new) broker connection is consuming with `prefetch` already set
  // (desired_prefetch() at the time) and the slot consumer started or not
  // (desired_slot_consumer()); later changes go through the BrokerPort.
  void on_connected(int prefetch, bool slot_consumer);
  // The connection is gone: everything unacked is the broker's again.
  void on_disconnected();
  // The broker closed the channel because a delivery went unacked for
  // `timeout` (its consumer_timeout; 0: unknown). Call before
  // on_disconnected(). Returns what ran that long, for logs and status
  // ("job <key> call <id>, ..."); empty when nothing did.
  std::string on_consumer_timeout(std::chrono::milliseconds timeout);
  void on_delivery(amqp::Delivery d);
  void on_confirm(const amqp::Confirm& c);
  // A queue.declare the dispatcher sent (BrokerPort::declare_queue) was
  // answered: `consumers` consume `queue` now.
  void on_declared(const std::string& queue, std::uint32_t consumers, Clock::time_point now = Clock::now());
  void on_handler_ready(int h);
  // One response line of handler h, parsed.
  void on_handler_reply(int h, const Json& reply);
  // Handler h died (the pool restarts it); `why` for logs and dead-letter headers.
  void on_handler_lost(int h, const std::string& why);
  // Time passed: gives back each task that waited reserve_patience in the
  // reserve and was not given back by this rank before.
  void on_tick(Clock::time_point now);
  // When on_tick has something to do next; nullopt: nothing waits for it.
  std::optional<Clock::time_point> next_deadline() const;
  // Stop consuming; give back what has not started.
  void drain();
  // The drain timeout passed: give back everything unacked (calls still
  // running will be killed by the caller).
  void abort();

  // --- state --------------------------------------------------------------
  bool draining() const { return m_draining; }
  // Nothing unacked and nothing running: a drain is complete.
  bool idle() const;
  int busy_slots() const;
  int prefetch() const { return m_prefetch; }
  // The prefetch count the current state calls for (protocol.h prefetch_for).
  int desired_prefetch() const;
  // Whether the slot consumer should run: while a slot is free; not while
  // every slot is busy and the reserve is free (the broker would pick this
  // rank's reserve like an idle rank's slot); left as it is while the
  // reserve holds a task (the broker then hands this rank nothing anyway).
  bool desired_slot_consumer() const;
  bool slot_consumer() const { return m_slot_consumer; }
  const Counters& counters() const { return m_counters; }
#if LHPC_TEST_HOOKS
  // Called with each message that ran here right before it is acked (not
  // with one moved to another runtime's queue): bench/dispatch.sh's latency
  // log (LITHOPS_HPC_LATENCY_LOG), in test builds only.
  void set_on_ack(std::function<void(const amqp::Delivery&)> fn) { m_on_ack = std::move(fn); }
#endif
  // Slots in use at most (runtime_memory): slots() unless memory caps it.
  int slot_cap() const { return m_slot_cap; }

private:
  enum class Kind { task, control, malformed, moved };
  enum class Phase { waiting, confirming, running };

  struct Message {
    std::uint64_t id = 0;
    amqp::Delivery d;
    std::string mid;  // for logs: the message id, control characters escaped
    Kind kind = Kind::task;
    Action action = Action::send_task;
    Json payload;                   // control requests
    Calls calls;                    // send_task: the calls as delivered
    std::size_t next = 0, end = 0;  // send_task: calls [next, end) kept and not handed out yet
    int crashes = 0;
    Phase phase = Phase::waiting;
    bool no_ack = false;     // came through the rank queue
    int running = 0;         // calls (or the control request) at a handler
    int confirms = 0;        // our publishes for it not yet confirmed
    bool give_back = false;  // end with reject(requeue) instead of ack
    bool holds_slots = false;
    bool orphan = false;   // its connection is gone: never acked
    bool patient = false;  // a task this rank gave back once already: it waits here now
    Clock::time_point arrived{};
  };
  struct Slot {
    bool ready = false;
    std::uint64_t reserved_for = 0;  // message id; 0: free
    std::uint64_t request = 0;       // request id at the handler; 0: idle
    std::string call;                // the one-call payload it runs (JSON text)
    std::string what;                // its call id, for logs
  };
  struct ControlRequest {
    std::uint64_t msg;
    std::uint64_t request;
  };
  enum class Purpose { remainder, crash_requeue, dead_letter, move };
  // Where a message that is not this deployment's goes (elsewhere()).
  struct Away {
    enum class To { queue, fanout, drop, invalid } to = To::queue;
    std::string target;  // queue or exchange; for invalid: what is wrong
  };
  struct PendingConfirm {
    std::uint64_t msg;
    Purpose purpose;
  };

  Message* find(std::uint64_t id);
  void schedule();
  void start_task(Message& m, std::size_t free);
  void start_calls(Message& m);
  void send_control();
  void accept(Message&& m);
  std::optional<Away> elsewhere(const Message& m, const Task& t) const;
  // Applies a send_task's runtime_memory; false when it cannot run on this rank at all.
  bool fits_memory(Message& m, const Json& payload);
  // A message waiting in the reserve that on_tick may give back once its
  // patience is out: not already given back once, not orphaned, acked.
  static bool may_give_back(const Message& m) { return !m.patient && !m.orphan && !m.no_ack; }
  void move_away(Message&& m, const Away& a);
  // The queue a message came from when that is this runtime's; else the task queue.
  std::string home_queue(const Message& m) const;
  void send_request(int h, std::uint64_t request, Action action, const std::string& payload_json);
  void maybe_complete(Message& m);
  void crashed(Message& m, const std::string& call_json, const std::string& what, const std::string& why);
  void answer_control(Message& m, bool ok, const Json& reply, const std::string& error);
  void dead_letter(Message& m, const std::string& body, const std::string& reason, int crashes);
  // A message refused before it was decoded: to <queue>.dead with `body`
  // (by value: it is often the message's own, which moves).
  void refuse(Message&& m, std::string body, const std::string& reason);
  // Noted consumer timeouts of a message with this body (hashed).
  int timeouts_of(const std::string& body) const;
  void release_slots(std::uint64_t msg);
  void update_prefetch();
  amqp::Properties republish_props(const Message& m) const;
  int free_slots() const;

  DispatcherOptions m_opts;
  BrokerPort& m_broker;
  HandlerPort& m_handlers;
  CrashRecordPort* m_record;
  bool m_connected = false;
  bool m_draining = false;
  bool m_aborted = false;
  int m_prefetch = 0;
  bool m_slot_consumer = false;
  int m_slot_cap = 0;
  std::uint64_t m_next_id = 1;
  std::uint64_t m_next_request = 1;
  std::map<std::uint64_t, Message> m_msgs;
  std::deque<std::uint64_t> m_waiting;                // send_task messages waiting for slots
  std::vector<Slot> m_slots;                          // slots + the control handler (last)
  std::deque<std::uint64_t> m_control_todo;           // control messages not yet sent
  std::deque<ControlRequest> m_control_out;           // sent to the control handler, in order
  std::map<std::uint64_t, PendingConfirm> m_pending;  // confirm seq -> what for
  Counters m_counters;
  std::map<std::size_t, int> m_timeouts;              // body hash -> consumer timeouts while it ran here
  std::set<std::size_t> m_returned;                   // body hashes of tasks given back from the reserve
  std::map<std::string, Clock::time_point> m_wanted;  // runtime -> when this rank last told about it
#if LHPC_TEST_HOOKS
  std::function<void(const amqp::Delivery&)> m_on_ack;
#endif
};

}  // namespace lhpc::dispatch
