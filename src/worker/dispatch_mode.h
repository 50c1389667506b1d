// Dispatch mode's wiring: the ports the dispatcher talks through (the broker
// connection and the handler pool), the broker (re)connection, and one
// poll() round over all of it. The lifecycle (drain, fail, stop) stays in
// worker.cc; this file only knows how dispatch mode does each part (Mode).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "amqp/connection.h"
#include "dispatch/dispatcher.h"
#include "dispatch/handler_pool.h"
#include "dispatch/inflight.h"
#include "lhpc_build_config.h"
#include "util/backoff.h"
#include "worker/broker.h"
#include "worker/mode.h"
#include "worker/worker.h"

namespace lhpc::worker {

#if LHPC_TEST_HOOKS
class LatencyLog;
#endif

class DispatchMode final : public Mode, public dispatch::BrokerPort, public dispatch::HandlerPool::Listener {
public:
  using Clock = std::chrono::steady_clock;
  static constexpr const char* k_handler_in_image = "/opt/lithops-hpc/handler.py";
  // Channel 1 carries the task queue's two consumers (their shared prefetch
  // is the dispatcher's); the rank queue has a channel of its own, without a
  // prefetch limit, so a ping reaches a rank whatever its slots hold.
  static constexpr std::uint16_t k_rank_channel = 2;
  // The slot consumer's x-priority; the reserve consumer has the default, 0.
  static constexpr int k_slot_priority = 10;
  static constexpr const char* k_reserve_tag = "lhpc-reserve";
  static constexpr const char* k_rank_tag = "lhpc-rank";
  // The same two consumers on the runtime's queue (dispatch/runtime.h), on
  // channel 1 as well: the channel's prefetch limit counts both queues.
  static constexpr const char* k_runtime_reserve_tag = "lhpc-runtime-reserve";
  // A slot consumer wanted within this long of the last task delivered
  // waits until no task has come for that long (a backlog keeps sending).
  static constexpr std::chrono::milliseconds k_slot_consumer_delay{50};

  // The handler script on this host (ours from the install or source tree,
  // bind-mounted over the image's copy so both sides speak the same protocol
  // version); empty when none is found. Throws for the host engine, which
  // has no image copy to fall back on.
  static std::string find_handler(bool host_engine);

  // `broker`: null for the real one (amqp/, from rabbitmq.*).
  explicit DispatchMode(const ModeContext& ctx, std::unique_ptr<BrokerConnector> broker = nullptr);
  ~DispatchMode() override;

  // Finds the handler script; binds ours over the image's copy.
  void prepare(container::InstanceSpec& spec) override;
  void start() override;
  std::optional<Done> step(std::chrono::milliseconds max_wait) override;
  void drain() override;
  // Stop consuming and give back everything held (the worker failed).
  void abort() override;
  void finish(std::chrono::milliseconds handler_grace) override;
  void stop() override;
  void fill(WorkerStats& s) const override;

private:
  // --- BrokerPort: never throws ---
  template <class F>
  auto guarded(F&& f) -> decltype(f());
  void ack(std::uint64_t tag) override;
  void reject(std::uint64_t tag, bool requeue) override;
  std::uint64_t publish(const std::string& rk, const std::string& body, const amqp::Properties& p) override;
  std::uint64_t publish_to_exchange(const std::string& exchange, const std::string& body,
                                    const amqp::Properties& p) override;
  void declare_queue(const std::string& name) override;
  void declare_exchange(const std::string& name) override;
  void set_prefetch(int n) override;
  void set_slot_consumer(bool active) override;
  void stop_consuming() override;
  // --- HandlerPool::Listener ---
  void handler_ready(int h, const dispatch::Json&) override;
  void handler_reply(int h, const dispatch::Json& reply) override;
  void handler_lost(int h, const std::string& why) override;
  void handler_failed_to_start(int) override;
  void handler_retired(int h, const std::string& why) override;

  dispatch::HandlerCommand handler_command(int h) const;
  std::chrono::milliseconds poll_timeout(std::chrono::milliseconds max_wait, Clock::time_point now) const;
  std::optional<Done> after_poll(bool broker_readable, Clock::time_point now);
  void connect_when_due(Clock::time_point now);
  void take_connection();
  void lost(std::string why);
  void pump(bool readable);
  std::optional<Done> check_drained(Clock::time_point now);
  void start_slot_consumer_when_due(Clock::time_point now);
  std::chrono::milliseconds pump_every() const;
  // Broker faults on a live connection (consumers cancelled, consumer
  // timeout, blocked): dispatch_faults.cc.
  void on_cancelled(std::vector<amqp::CancelledConsumer> gone, Clock::time_point now);
  void restore_consumers_when_due(Clock::time_point now);
  // Before the connection is dropped: a close for the broker's
  // consumer_timeout is noted and described (empty for any other loss).
  std::string note_close();
  bool consuming() const;
  bool restore_pending() const {
    return m_reserve_cancelled || m_slot_cancelled || m_rank_cancelled || m_runtime_reserve_cancelled ||
           m_runtime_slot_cancelled;
  }
  bool task_queue_cancelled() const { return m_reserve_cancelled || m_slot_cancelled; }
  bool runtime_queue_cancelled() const { return m_runtime_reserve_cancelled || m_runtime_slot_cancelled; }
  // The queues whose consumers the broker cancelled, for the log ("a and b").
  std::string cancelled_queues() const;
  void restore_runtime_queue();
  // A slot consumer is wanted, due and not there on a queue not cancelled.
  bool task_slot_consumer_missing() const;
  bool runtime_slot_consumer_missing() const;
  void log_totals() const;

  const ModeContext& m_ctx;
  std::string m_handler_path;  // where the handler runs it from (inside the instance or on the host)
  std::unique_ptr<BrokerConnector> m_reconnect;
  std::unique_ptr<BrokerLink> m_conn;
  std::string m_slot_tag;          // the slot consumer's tag; empty while it is cancelled
  std::string m_runtime_queue;     // this runtime's queue; empty: the deployment serves every runtime
  std::string m_runtime_slot_tag;  // the slot consumer's on it
  int m_slot_consumers = 0;        // started on this connection: each gets a new tag
  bool m_connecting_slot_consumer = false;
  bool m_slot_wanted = false;  // the dispatcher asked for it; started at m_slot_due
  Clock::time_point m_slot_due{};
  Clock::time_point m_last_task_delivery{};
  std::string m_broker_error;  // set by a port call that failed; handled after the batch
  int m_connecting_prefetch = 0;
  Clock::time_point m_last_pump{};
  bool m_connected_once = false;
  std::unique_ptr<dispatch::InflightRecord> m_inflight;  // before the dispatcher that points to it
  std::string m_rank_queue;                              // ping reaches this rank through it
  std::unique_ptr<dispatch::Dispatcher> m_dispatcher;
  std::unique_ptr<dispatch::HandlerPool> m_pool;
#if LHPC_TEST_HOOKS
  std::unique_ptr<LatencyLog> m_latency;  // bench/dispatch.sh: LITHOPS_HPC_LATENCY_LOG
#endif
  // Consumers the broker cancelled on this connection, restored (declare,
  // consume) at m_restore_due; the backoff resets once one stays up.
  bool m_reserve_cancelled = false;
  bool m_slot_cancelled = false;
  bool m_rank_cancelled = false;
  bool m_runtime_reserve_cancelled = false;  // the runtime queue's (deleted, with its fanout binding)
  bool m_runtime_slot_cancelled = false;
  Backoff m_restore_backoff{std::chrono::milliseconds(250), std::chrono::milliseconds(30000)};
  Clock::time_point m_restore_due{};
  Clock::time_point m_restored_at{};
};

}  // namespace lhpc::worker
