#include "stage/layout.h"

#include <algorithm>
#include <charconv>
#include <map>

#include "util/fs.h"

namespace lhpc::stage {

std::string private_dir_prefix(uid_t uid) { return "lithops-hpc-" + std::to_string(uid) + "-"; }

std::string private_dir(const std::string& sif_dir, uid_t uid, const std::string& jobid) {
  std::string base = sif_dir;
  while (base.size() > 1 && base.back() == '/') {
    base.pop_back();
  }
  return (base == "/" ? "" : base) + "/" + private_dir_prefix(uid) + jobid;
}

std::string staged_path(const std::string& dir, const std::string& source) { return dir + "/" + basename_of(source); }

std::string record_path(const std::string& staged) { return staged + ".stage.json"; }

namespace {
std::string partial_prefix(const std::string& staged) { return "." + basename_of(staged) + ".part-"; }
}  // namespace

std::string partial_path(const std::string& staged, pid_t pid) {
  return dirname_of(staged) + "/" + partial_prefix(staged) + std::to_string(pid);
}

std::string sbcast_partial_path(const std::string& staged) {
  return dirname_of(staged) + "/" + partial_prefix(staged) + "sbcast";
}

bool is_partial_of(const std::string& staged, const std::string& name) {
  auto p = partial_prefix(staged);
  return name.size() > p.size() && name.compare(0, p.size(), p) == 0;
}

pid_t partial_pid(const std::string& staged, const std::string& name) {
  if (!is_partial_of(staged, name)) {
    return -1;
  }
  auto digits = std::string_view(name).substr(partial_prefix(staged).size());
  pid_t pid = -1;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), pid);
  if (ec != std::errc() || end != digits.data() + digits.size() || pid <= 0) {
    return -1;
  }
  return pid;
}

bool NodeMap::is_leader(int rank) const {
  if (rank < 0 || static_cast<std::size_t>(rank) >= node_of_rank.size()) {
    return false;
  }
  return leader_of_node[static_cast<std::size_t>(node_of_rank[static_cast<std::size_t>(rank)])] == rank;
}

NodeMap map_nodes(const std::vector<std::string>& node_id_of_rank) {
  NodeMap m;
  std::map<std::string, int> index;
  for (std::size_t r = 0; r < node_id_of_rank.size(); ++r) {
    auto [it, fresh] = index.emplace(node_id_of_rank[r], static_cast<int>(m.names.size()));
    if (fresh) {
      m.names.push_back(node_id_of_rank[r]);
      m.leader_of_node.push_back(static_cast<int>(r));
    }
    m.node_of_rank.push_back(it->second);
  }
  return m;
}

std::uint64_t chunk_count(std::uint64_t size, std::uint64_t chunk) {
  return chunk == 0 ? 0 : (size + chunk - 1) / chunk;
}

std::size_t chunk_length(std::uint64_t size, std::uint64_t chunk, std::uint64_t index) {
  std::uint64_t start = index * chunk;
  if (start >= size) {
    return 0;
  }
  return static_cast<std::size_t>(std::min(chunk, size - start));
}

}  // namespace lhpc::stage
