#include "health/memory.h"

#include <dirent.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace lhpc::health {

namespace {

std::uint64_t vm_rss_kb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::strtoull(line.c_str() + 6, nullptr, 10);  // "VmRSS:    1234 kB"
    }
  }
  return 0;  // gone, or a kernel thread
}

std::vector<std::string> dir_entries(const std::string& path) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(path.c_str())) {
    while (auto* e = ::readdir(d)) {
      if (e->d_name[0] != '.') {
        out.emplace_back(e->d_name);
      }
    }
    ::closedir(d);
  }
  return out;
}

// Appends PID's children; false when the kernel has no /proc/PID/task/TID/children.
bool children_via_task_files(pid_t pid, std::vector<pid_t>& out) {
  auto base = "/proc/" + std::to_string(pid) + "/task";
  bool any_file = false;
  for (const auto& tid : dir_entries(base)) {
    std::ifstream in(base + "/" + tid + "/children");
    if (!in) {
      continue;
    }
    any_file = true;
    pid_t c = 0;
    while (in >> c) {
      out.push_back(c);
    }
  }
  return any_file;
}

std::map<pid_t, std::vector<pid_t>> children_by_scan() {
  std::map<pid_t, std::vector<pid_t>> tree;
  for (const auto& name : dir_entries("/proc")) {
    char* end = nullptr;
    long p = std::strtol(name.c_str(), &end, 10);
    if (*end != '\0' || p <= 0) {
      continue;
    }
    std::ifstream in("/proc/" + name + "/stat");
    std::string stat;
    std::getline(in, stat);
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    auto close = stat.rfind(')');
    if (close == std::string::npos) {
      continue;
    }
    std::istringstream rest(stat.substr(close + 1));
    std::string state;
    pid_t ppid = 0;
    if (rest >> state >> ppid) {
      tree[ppid].push_back(static_cast<pid_t>(p));
    }
  }
  return tree;
}

}  // namespace

Memory read_memory(pid_t pid) {
  if (pid <= 0) {
    pid = ::getpid();
  }
  Memory m;
  m.self_kb = vm_rss_kb(pid);
  m.tree_kb = m.self_kb;

  std::vector<pid_t> first;
  bool have_files = children_via_task_files(pid, first);
  std::map<pid_t, std::vector<pid_t>> scanned;
  if (!have_files) {
    scanned = children_by_scan();
    first = scanned[pid];
  }
  std::set<pid_t> seen{pid};
  std::vector<pid_t> todo = first;
  while (!todo.empty()) {
    pid_t p = todo.back();
    todo.pop_back();
    if (!seen.insert(p).second) {
      continue;  // pids reused while we read: never loop
    }
    m.tree_kb += vm_rss_kb(p);
    std::vector<pid_t> kids;
    if (have_files) {
      children_via_task_files(p, kids);
    } else {
      kids = scanned[p];
    }
    todo.insert(todo.end(), kids.begin(), kids.end());
  }
  return m;
}

}  // namespace lhpc::health
