// MPI session: init with MPI_THREAD_FUNNELED (only the event-loop thread
// calls MPI) and finalize on scope exit. Started without a launcher, Open MPI
// runs us as a singleton: one rank, a complete local deployment.
#pragma once

#include <mpi.h>

#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "util/error.h"

namespace lhpc {

class MpiSession {
public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const noexcept { return m_rank; }
  int size() const noexcept { return m_size; }
  MPI_Comm world() const noexcept { return MPI_COMM_WORLD; }
  // Ends every rank with `code` (a rank that cannot go on while others wait in
  // a collective): the one way besides main.cc an Exit becomes the process's status.
  // Static: code that holds no session (stage) calls it too.
  [[noreturn]] static void abort(Exit code);

private:
  int m_rank = 0;
  int m_size = 1;
};

// An error every rank holds alike (a failed collective step): rank 0 logs
// it with its hint, the others at debug level, flushed at once. Call it
// before MPI_Finalize: once one rank has left non-zero, mpirun kills the
// others, so a report from main() would come too late.
void log_collective_error(int rank, const Error& e);

// A barrier that naps `nap` between tests instead of spinning, as Open MPI's
// blocking collectives do, so that waiting ranks leave the CPU to working
// ones. `between` runs after every test that found the barrier incomplete
// (to check deadlines or signals; it may end the process).
void barrier_quietly(MPI_Comm comm, std::chrono::nanoseconds nap, const std::function<void()>& between = {});

// Every rank's string, gathered to every rank (e.g. node ids), in rank order.
std::vector<std::string> allgather_strings(MPI_Comm comm, const std::string& mine);

// One rank's result of a step all ranks must agree on: the Error it failed
// with (nullopt: it succeeded) and whatever data it shares with the others.
struct Outcome {
  std::optional<Error> error;
  nlohmann::json data = nlohmann::json::object();
};

// "Every rank learns who failed": each rank's outcome, gathered to every
// rank in rank order. Errors cross ranks as JSON, so they keep their
// message, hint and exit code whatever their length.
std::vector<Outcome> share_outcomes(MPI_Comm comm, const Outcome& mine);

// The same when only `root` did the work: every rank gets root's data, or
// throws root's Error (same message, hint and exit code on every rank).
nlohmann::json share_root_outcome(MPI_Comm comm, int root, const Outcome& mine);

}  // namespace lhpc
