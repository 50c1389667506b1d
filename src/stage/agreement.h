// Stage's collective agreements. Every phase of stage is local work whose
// failure is caught, then one agreement over the whole communicator, so all
// ranks throw the same Error (signals first, the failing nodes named) and
// none is left waiting alone in a collective.
#pragma once

#include <mpi.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "stage/layout.h"
#include "util/mpi.h"

namespace lhpc::stage {

// The ranks of a stage and the node each works for.
struct World {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  NodeMap map;
  int node = 0;
  bool leader = true;
  bool root() const { return rank == 0; }
  const std::string& node_name() const { return map.names[static_cast<std::size_t>(node)]; }
  std::string where(int r) const;  // "node n2 (rank 3)"
};
World make_world(MPI_Comm comm, const std::string& node_id);  // collective

// How a SIGINT/SIGTERM received so far ends the stage (interrupted or
// terminated); nullopt when none came.
std::optional<Exit> signal_exit();
std::string signal_name(Exit code);  // "SIGINT" for interrupted, else "SIGTERM"
// For long local loops (hashing): throws the interrupted Error once signalled.
void throw_if_signalled();

Outcome ok(nlohmann::json data = nlohmann::json::object());
Outcome failed(Exit code, const std::string& msg, const std::string& hint = {});

// Runs local work; whatever it throws becomes this rank's failure. A signal
// that arrived meanwhile wins: it is what the user asked for.
// `interruptible`: a signal turns success into "interrupted"; cleanup is not,
// since it runs after a signal-initiated drain on purpose.
Outcome attempt(const std::function<nlohmann::json()>& work, bool interruptible = true);

// The same verdict on every rank from everyone's outcome: signals first
// (SIGTERM over SIGINT), else the lowest failing rank's code and hint, with
// every failing node named.
void throw_if_failed(const World& w, const std::vector<Outcome>& all, const std::string& what);

// share_outcomes, then throw_if_failed: the agreement that ends each phase.
std::vector<Outcome> agree(const World& w, const Outcome& mine, const std::string& what);

}  // namespace lhpc::stage
