// Health over MPI, non-blocking only: a hung or stopped rank never hangs
// rank 0, and a hung rank 0 never hangs the others. Reports flow to rank 0 on
// one tag, commands flow from rank 0 on another; every call returns at once.
// Single-threaded use (MPI_THREAD_FUNNELED: the event-loop thread only).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <list>
#include <optional>
#include <string_view>
#include <vector>

#include "health/report.h"

namespace lhpc::health {

// Tags of our point-to-point traffic on the communicator we are given
// (staging uses collectives and its own tags; these are ours alone).
inline constexpr int k_report_tag = 0x4C48;   // rank -> rank 0: Report
inline constexpr int k_control_tag = 0x4C49;  // rank 0 -> rank: Control

// What rank 0 tells the others.
enum class Command : std::uint32_t {
  none = 0,
  drain = 1,     // stop taking tasks, finish the running ones (then stop)
  stop = 2,      // stop now: give running tasks back to the queue
  finalize = 3,  // shutdown exchange: every rank reported stopped, call MPI_Finalize
};
inline constexpr Names<Command, 4> k_command_names{{{
    {Command::none, "none"},
    {Command::drain, "drain"},
    {Command::stop, "stop"},
    {Command::finalize, "finalize"},
}}};

struct Control {
  std::uint32_t version = k_report_version;
  Command command = Command::none;
  std::uint64_t seq = 0;
};
static_assert(sizeof(Control) == 16);

class Transport {
public:
  // `comm` must outlive the transport; rank 0 of `comm` is the collector.
  explicit Transport(MPI_Comm comm);
  // Requests still in flight are released (MPI_Request_free) and their
  // buffers deliberately leaked: MPI may still read them.
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  int rank() const noexcept { return m_rank; }
  int size() const noexcept { return m_size; }
  bool is_root() const noexcept { return m_rank == 0; }

  // --- every rank but 0 ---
  // Never blocks. At most one report is in flight: when the previous one has
  // not completed yet, `r` is kept (replacing any older kept one) and goes out
  // on a later progress(). True when `r` went out now.
  bool send(const Report& r);
  // Commands rank 0 sent, in order, as they arrive (MPI_Improbe/MPI_Mrecv).
  std::vector<Command> poll_control();

  // --- rank 0 ---
  // Every report that has arrived (MPI_Improbe on any source, MPI_Mrecv).
  // Malformed ones (wrong size or version, rank not matching the sender) are
  // logged and dropped. Returns after `max` reports (0: 4 per rank + 16) so a
  // flood cannot starve the event loop.
  std::vector<Report> poll(std::size_t max = 0);
  // One non-blocking send of `c` to every other rank.
  void broadcast_control(Command c);

  // --- both ---
  // Completes what can be completed and pushes a kept report out. Cheap;
  // call every loop turn (send/poll/poll_control call it too).
  void progress();
  // Nothing in flight and nothing kept (non-root: the last report left).
  bool idle() const noexcept;

private:
  struct Outgoing {
    MPI_Request request = MPI_REQUEST_NULL;
    Report report{};
    Control control{};
  };
  bool start_report(const Report& r);

  MPI_Comm m_comm;
  int m_rank = 0;
  int m_size = 1;
  std::uint64_t m_control_seq = 0;
  // std::list: MPI holds pointers into these buffers until completion.
  std::list<Outgoing> m_out;
  Outgoing* m_report_in_flight = nullptr;
  std::optional<Report> m_kept;
  bool m_warned_send = false;
};

}  // namespace lhpc::health
