#include "stage/agreement.h"

#include "util/error.h"
#include "util/signals.h"

namespace lhpc::stage {

using nlohmann::json;

namespace {

bool is_signal(Exit code) { return code == Exit::interrupted || code == Exit::terminated; }

Exit code_of(const Outcome& o) { return o.error ? o.error->code() : Exit::ok; }

std::string failure_list(const World& w, const std::vector<Outcome>& all, const std::vector<int>& failed,
                         const std::string& what) {
  if (failed.size() == 1) {
    return what + " failed on " + w.where(failed.front()) + ": " +
           all[static_cast<std::size_t>(failed.front())].error->what();
  }
  std::string msg = what + " failed on " + std::to_string(failed.size()) + " ranks: ";
  std::size_t shown = 0;
  for (int r : failed) {
    if (shown == 4) {
      msg += "; and " + std::to_string(failed.size() - shown) + " more";
      break;
    }
    msg += (shown ? "; " : "") + w.where(r) + ": " + all[static_cast<std::size_t>(r)].error->what();
    ++shown;
  }
  return msg;
}

}  // namespace

std::string World::where(int r) const {
  return "node " + map.names[static_cast<std::size_t>(map.node_of_rank[static_cast<std::size_t>(r)])] + " (rank " +
         std::to_string(r) + ")";
}

World make_world(MPI_Comm comm, const std::string& node_id) {
  World w;
  w.comm = comm;
  MPI_Comm_rank(comm, &w.rank);
  MPI_Comm_size(comm, &w.size);
  w.map = map_nodes(allgather_strings(comm, node_id));
  w.node = w.map.node_of_rank[static_cast<std::size_t>(w.rank)];
  w.leader = w.map.is_leader(w.rank);
  return w;
}

std::optional<Exit> signal_exit() {
  int s = SignalPipe::last_terminating();
  return s != 0 ? std::optional<Exit>(exit_for_signal(s)) : std::nullopt;
}

std::string signal_name(Exit code) { return code == Exit::interrupted ? "SIGINT" : "SIGTERM"; }

void throw_if_signalled() {
  if (auto sig = signal_exit()) {
    throw Error(*sig, "interrupted by " + signal_name(*sig));
  }
}

Outcome ok(json data) { return Outcome{.error = std::nullopt, .data = std::move(data)}; }

Outcome failed(Exit code, const std::string& msg, const std::string& hint) {
  return Outcome{.error = Error(code, msg, hint), .data = json::object()};
}

Outcome attempt(const std::function<json()>& work, bool interruptible) {
  Outcome out;
  try {
    out = ok(work());
  } catch (const Error& e) {
    out.error = e;
  } catch (const std::exception& e) {
    out.error = Error(Exit::failure, std::string("internal error: ") + e.what());
  }
  if (auto sig = signal_exit(); interruptible && sig && !out.error) {
    out = failed(*sig, "interrupted by " + signal_name(*sig));
  }
  return out;
}

void throw_if_failed(const World& w, const std::vector<Outcome>& all, const std::string& what) {
  std::optional<Exit> sig;  // SIGTERM (143) over SIGINT (130)
  int sig_rank = -1;
  std::vector<int> failed_ranks;
  for (int r = 0; r < w.size; ++r) {
    Exit code = code_of(all[static_cast<std::size_t>(r)]);
    if (is_signal(code)) {
      if (!sig || code > *sig) {
        sig = code;
        sig_rank = r;
      }
    } else if (code != Exit::ok) {
      failed_ranks.push_back(r);
    }
  }
  if (sig) {
    throw Error(*sig, what + " interrupted by " + signal_name(*sig) + " on " + w.where(sig_rank) +
                          ": stopped on every rank, partial copies removed");
  }
  if (failed_ranks.empty()) {
    return;
  }
  const auto& first = *all[static_cast<std::size_t>(failed_ranks.front())].error;
  throw Error(first.code(), failure_list(w, all, failed_ranks, what), first.hint());
}

std::vector<Outcome> agree(const World& w, const Outcome& mine, const std::string& what) {
  auto all = share_outcomes(w.comm, mine);
  throw_if_failed(w, all, what);
  return all;
}

}  // namespace lhpc::stage
