#include "util/mpi.h"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>

#include "util/error.h"

namespace lhpc {

MpiSession::MpiSession(int* argc, char*** argv) {
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    throw Error(Exit::failure, "MPI_Init_thread failed",
                "under Slurm launch with srun --mpi=pmix; elsewhere use mpirun, or run without a launcher");
  }
  // Errors come back as codes we turn into messages naming the rank.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &m_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &m_size);
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    MPI_Finalize();
  }
}

void MpiSession::abort(Exit code) {
  MPI_Abort(MPI_COMM_WORLD, static_cast<int>(code));
  std::_Exit(static_cast<int>(code));
}

void log_collective_error(int rank, const Error& e) {
  if (rank == 0) {
    spdlog::error("{}", e.what());
    if (!e.hint().empty()) {
      spdlog::error("hint: {}", e.hint());
    }
  } else {
    spdlog::debug("{}", e.what());
  }
  spdlog::default_logger()->flush();
  std::fflush(stdout);
}

void barrier_quietly(MPI_Comm comm, std::chrono::nanoseconds nap, const std::function<void()>& between) {
  MPI_Request r = MPI_REQUEST_NULL;
  MPI_Ibarrier(comm, &r);
  const timespec ts{static_cast<time_t>(nap.count() / 1'000'000'000), static_cast<long>(nap.count() % 1'000'000'000)};
  for (int done = 0;;) {
    MPI_Test(&r, &done, MPI_STATUS_IGNORE);
    if (done) {
      return;
    }
    if (between) {
      between();
    }
    ::nanosleep(&ts, nullptr);
  }
}

std::vector<std::string> allgather_strings(MPI_Comm comm, const std::string& mine) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<std::size_t>(size));
  MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm);
  std::vector<int> displs(static_cast<std::size_t>(size));
  int total = 0;
  for (int i = 0; i < size; ++i) {
    displs[static_cast<std::size_t>(i)] = total;
    total += lens[static_cast<std::size_t>(i)];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, comm);
  std::vector<std::string> out;
  for (int i = 0; i < size; ++i) {
    out.push_back(all.substr(static_cast<std::size_t>(displs[static_cast<std::size_t>(i)]),
                             static_cast<std::size_t>(lens[static_cast<std::size_t>(i)])));
  }
  return out;
}

namespace {

nlohmann::json outcome_json(const Outcome& o) {
  nlohmann::json j = {{"data", o.data}};
  if (o.error) {
    j["code"] = static_cast<int>(o.error->code());
    j["msg"] = o.error->what();
    j["hint"] = o.error->hint();
  }
  return j;
}

Outcome outcome_from(const std::string& text) {
  // Our own ranks wrote it; a parse failure would be a bug, and it still
  // reaches the user as an error rather than a crash.
  auto j = nlohmann::json::parse(text, nullptr, false);
  Outcome o;
  if (!j.is_object()) {
    o.error = Error(Exit::failure, "internal error: a rank's outcome is not JSON");
    return o;
  }
  o.data = j.value("data", nlohmann::json::object());
  if (j.contains("code")) {
    o.error =
        Error(static_cast<Exit>(j.value("code", 1)), j.value("msg", std::string()), j.value("hint", std::string()));
  }
  return o;
}

}  // namespace

std::vector<Outcome> share_outcomes(MPI_Comm comm, const Outcome& mine) {
  std::vector<Outcome> out;
  for (const auto& s : allgather_strings(comm, outcome_json(mine).dump())) {
    out.push_back(outcome_from(s));
  }
  return out;
}

nlohmann::json share_root_outcome(MPI_Comm comm, int root, const Outcome& mine) {
  int me = 0;
  MPI_Comm_rank(comm, &me);
  std::string s = me == root ? outcome_json(mine).dump() : std::string();
  unsigned long long n = s.size();
  MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG_LONG, root, comm);
  s.resize(static_cast<std::size_t>(n));
  MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, root, comm);
  auto o = outcome_from(s);
  if (o.error) {
    throw *o.error;
  }
  return o.data;
}

}  // namespace lhpc
