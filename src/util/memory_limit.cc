#include "util/memory_limit.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace lhpc {

namespace {

constexpr std::uint64_t k_mib = 1024 * 1024;
constexpr std::uint64_t k_unset_v1 = std::uint64_t{1} << 60;  // v1 prints about 2^63 for "no limit"

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  while (!s.empty() && s.front() == ' ') {
    s.remove_prefix(1);
  }
  return s;
}

std::optional<std::uint64_t> number(std::string_view s) {
  s = trim(s);
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) {
    return std::nullopt;
  }
  return v;
}

std::optional<std::string> read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) {
    return std::nullopt;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The lowest limit from the cgroup up to the root of its hierarchy: a
// parent's limit binds its children too.
std::optional<std::uint64_t> cgroup_limit_mb() {
  auto self = read_text("/proc/self/cgroup");
  auto cg = self ? parse_proc_cgroup(*self) : std::nullopt;
  if (!cg) {
    return std::nullopt;
  }
  std::string root = cg->v1 ? "/sys/fs/cgroup/memory" : "/sys/fs/cgroup";
  const char* file = cg->v1 ? "/memory.limit_in_bytes" : "/memory.max";
  std::optional<std::uint64_t> best;
  std::string path = cg->path;
  while (true) {
    if (auto text = read_text(root + (path == "/" ? "" : path) + file)) {
      if (auto mb = parse_cgroup_limit_mb(*text)) {
        best = best ? std::min(*best, *mb) : *mb;
      }
    }
    if (path.empty() || path == "/") {
      break;
    }
    auto slash = path.rfind('/');
    path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
  }
  return best;
}

}  // namespace

std::optional<std::uint64_t> parse_cgroup_limit_mb(std::string_view text) {
  auto v = number(text);
  if (!v || *v >= k_unset_v1) {
    return std::nullopt;
  }
  return *v / k_mib;
}

std::optional<CgroupPath> parse_proc_cgroup(std::string_view text) {
  std::optional<CgroupPath> v2;
  while (!text.empty()) {
    auto nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    auto c1 = line.find(':');
    auto c2 = c1 == std::string_view::npos ? c1 : line.find(':', c1 + 1);
    if (c2 == std::string_view::npos) {
      continue;
    }
    std::string_view controllers = line.substr(c1 + 1, c2 - c1 - 1);
    std::string path(line.substr(c2 + 1));
    if (controllers.empty() && line.substr(0, c1) == "0") {
      v2 = CgroupPath{path, false};
      continue;
    }
    // v1: "memory" alone or among others ("cpu,memory").
    std::string list = "," + std::string(controllers) + ",";
    if (list.find(",memory,") != std::string::npos) {
      return CgroupPath{path, true};
    }
  }
  return v2;
}

std::optional<std::uint64_t> slurm_memory_mb(const char* per_node, const char* per_cpu, const char* cpus_on_node) {
  if (per_node && *per_node) {
    if (auto v = number(per_node); v && *v > 0) {
      return v;
    }
  }
  if (per_cpu && *per_cpu && cpus_on_node && *cpus_on_node) {
    auto m = number(per_cpu);
    auto c = number(cpus_on_node);
    if (m && c && *m > 0 && *c > 0) {
      return *m * *c;
    }
  }
  return std::nullopt;
}

std::optional<std::uint64_t> meminfo_total_mb(std::string_view meminfo) {
  auto at = meminfo.find("MemTotal:");
  if (at == std::string_view::npos) {
    return std::nullopt;
  }
  auto rest = meminfo.substr(at + 9);
  auto kb = rest.find("kB");
  if (kb == std::string_view::npos) {
    return std::nullopt;
  }
  auto v = number(rest.substr(0, kb));
  if (!v) {
    return std::nullopt;
  }
  return *v / 1024;
}

std::uint64_t job_memory_mb() {
  std::optional<std::uint64_t> best;
  auto take = [&](std::optional<std::uint64_t> v) {
    if (v && *v > 0) {
      best = best ? std::min(*best, *v) : *v;
    }
  };
  take(cgroup_limit_mb());
  take(slurm_memory_mb(std::getenv("SLURM_MEM_PER_NODE"), std::getenv("SLURM_MEM_PER_CPU"),
                       std::getenv("SLURM_CPUS_ON_NODE")));
  if (auto mi = read_text("/proc/meminfo")) {
    take(meminfo_total_mb(*mi));
  }
  return best.value_or(0);
}

}  // namespace lhpc
