// Where stage puts things and who does the work: the private directory and
// file names on a node, which rank leads each node, and how an image is cut
// into chunks. Pure functions, so they are tested without MPI.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lhpc::stage {

// <sif_dir>/lithops-hpc-<uid>-<jobid>: one per user and job, mode 0700.
std::string private_dir(const std::string& sif_dir, uid_t uid, const std::string& jobid);
// Prefix every private directory of `uid` starts with (to find earlier jobs' copies).
std::string private_dir_prefix(uid_t uid);
// The staged image: <dir>/<basename of the source>.
std::string staged_path(const std::string& dir, const std::string& source);
// The hash record beside a staged image: <image>.stage.json.
std::string record_path(const std::string& staged);
// Where a leader writes before the hash is known to match: a dot file beside
// the image, named after this process so two runs never share one.
std::string partial_path(const std::string& staged, pid_t pid);
// sbcast writes one path on every node, so its partial cannot name a pid.
std::string sbcast_partial_path(const std::string& staged);
// True for names partial_path/sbcast_partial_path make for `staged` (stale-partial cleanup).
bool is_partial_of(const std::string& staged, const std::string& name);
// The pid in a partial_path() name, or -1.
pid_t partial_pid(const std::string& staged, const std::string& name);

// Which rank leads which node. Nodes are numbered in order of their first
// rank; a node's leader is its lowest rank.
struct NodeMap {
  std::vector<int> node_of_rank;    // rank -> node index
  std::vector<int> leader_of_node;  // node index -> leader rank
  std::vector<std::string> names;   // node index -> node id
  int nodes() const { return static_cast<int>(names.size()); }
  bool is_leader(int rank) const;
};
NodeMap map_nodes(const std::vector<std::string>& node_id_of_rank);

// Chunks of `chunk` bytes; the last one holds the rest. An empty file has no chunks.
std::uint64_t chunk_count(std::uint64_t size, std::uint64_t chunk);
std::size_t chunk_length(std::uint64_t size, std::uint64_t chunk, std::uint64_t index);

}  // namespace lhpc::stage
