#include "autoalloc/local_scheduler.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <cerrno>
#include <ctime>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/json_number.h"

namespace lhpc::autoalloc {

namespace {

using json = nlohmann::ordered_json;

constexpr std::size_t k_max_record = 64 * 1024;

std::optional<ProcStat> read_proc_stat(long pid) {
  try {
    return parse_proc_stat(read_file("/proc/" + std::to_string(pid) + "/stat"));
  } catch (const Error&) {
    return std::nullopt;  // gone
  }
}

UniqueFd records_dir(const LocalOptions& o) { return open_private_dir(o.records, true); }

}  // namespace

std::string to_json(const LocalRecord& r) {
  json j = {{"version", 1},     {"id", r.id},        {"name", r.name}, {"pgid", r.pgid}, {"start_ticks", r.start_ticks},
            {"nodes", r.nodes}, {"output", r.output}};
  return j.dump(2) + "\n";
}

std::optional<LocalRecord> local_record_from_json(const std::string& text, const std::string& source) {
  auto j = json::parse(text, nullptr, false);
  auto text_of = [&](const char* key) -> std::optional<std::string> {
    auto it = j.find(key);
    return it != j.end() && it->is_string() ? std::optional<std::string>(it->get<std::string>()) : std::nullopt;
  };
  if (!j.is_object()) {
    spdlog::warn("{}: not a local job record (ignored)", source);
    return std::nullopt;
  }
  auto id = text_of("id");
  auto name = text_of("name");
  auto output = text_of("output");
  LocalRecord r;
  r.pgid = j.contains("pgid") ? json_integer<long>(j["pgid"]).value_or(0) : 0;
  r.start_ticks = j.contains("start_ticks") ? json_integer<std::uint64_t>(j["start_ticks"]).value_or(0) : 0;
  r.nodes = j.contains("nodes") ? json_integer<int>(j["nodes"]).value_or(0) : 0;
  if (!id || !name || !output || r.pgid <= 1 || r.nodes < 1) {
    spdlog::warn("{}: a local job record without a valid id, name, pgid, nodes or output (ignored)", source);
    return std::nullopt;
  }
  try {
    check_path_component("the job id in " + source, *id);
  } catch (const Error& e) {
    spdlog::warn("{} (ignored)", e.what());
    return std::nullopt;
  }
  r.id = *id;
  r.name = *name;
  r.output = *output;
  return r;
}

std::optional<ProcStat> parse_proc_stat(const std::string& text) {
  auto close = text.rfind(')');
  if (close == std::string::npos) {
    return std::nullopt;
  }
  // After "pid (comm)": state(3) ppid(4) pgrp(5) ... starttime(22).
  std::istringstream in(text.substr(close + 1));
  std::vector<std::string> f;
  std::string w;
  while (in >> w && f.size() < 20) {
    f.push_back(w);
  }
  if (f.size() < 20 || f[0].size() != 1) {
    return std::nullopt;
  }
  try {
    std::size_t used = 0;
    ProcStat s;
    s.state = f[0][0];
    s.pgrp = std::stol(f[2], &used);
    if (used != f[2].size()) {
      return std::nullopt;
    }
    s.start_ticks = std::stoull(f[19], &used);
    if (used != f[19].size() || f[19][0] == '-') {
      return std::nullopt;
    }
    return s;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

bool group_alive(const LocalRecord& r, bool signalable, const std::optional<ProcStat>& leader) {
  if (!signalable) {
    return false;  // no process in the group, or none of ours
  }
  if (!leader) {
    return true;  // mpirun ended, other members of its group still run
  }
  if (leader->start_ticks != r.start_ticks) {
    return false;  // the number went to another process after ours ended
  }
  // A zombie: mpirun has ended, its parent has not reaped it yet.
  return leader->state != 'Z';
}

std::string local_job_id(long unix_seconds, long pid, unsigned long n) {
  return fmt::format("local-{}-{}-{}", unix_seconds, pid, n);
}

std::string local_output(const std::string& dir, const std::string& id) {
  return dir + "/lithops-workers-" + id + ".out";
}

std::vector<std::string> local_argv(const LocalOptions& o, const Submission& s) {
  std::vector<std::string> argv = {o.mpirun, "-n", std::to_string(s.nodes)};
  argv.insert(argv.end(), o.launcher_args.begin(), o.launcher_args.end());
  argv.insert(argv.end(), {o.self, "deploy"});
  if (!s.sif.empty()) {
    argv.insert(argv.end(), {"--sif", s.sif});
  }
  if (!s.runtime.empty()) {
    argv.insert(argv.end(), {"--runtime", s.runtime});
  }
  // The image is a file of this machine already: nothing to copy, nothing to clean up.
  argv.insert(argv.end(), {"--transfer", "none"});
  return argv;
}

// ------------------------------------------------------------ LocalScheduler

LocalScheduler::LocalScheduler(LocalOptions o) : m_o(std::move(o)) { records_dir(m_o); }

LocalScheduler::~LocalScheduler() {
  for (auto& [id, child] : m_children) {
    child.release();
  }
}

void LocalScheduler::reap() {
  for (auto& [id, child] : m_children) {
    if (child.running()) {
      child.try_wait();
    }
  }
}

std::optional<LocalRecord> LocalScheduler::record_of(const std::string& id) {
  auto path = m_o.records + "/" + id + ".json";
  try {
    check_path_component("job id", id);
    auto text = read_private_file(path, k_max_record);
    return text ? local_record_from_json(*text, path) : std::nullopt;
  } catch (const Error& e) {
    spdlog::warn("{}", e.what());
    return std::nullopt;
  }
}

bool LocalScheduler::alive(const LocalRecord& r) {
  reap();  // a zombie mpirun of ours would still answer the signal
  bool signalable = ::kill(static_cast<pid_t>(-r.pgid), 0) == 0;
  return group_alive(r, signalable, signalable ? read_proc_stat(r.pgid) : std::nullopt);
}

void LocalScheduler::forget(const std::string& id) {
  ::unlink((m_o.records + "/" + id + ".json").c_str());
  if (auto it = m_children.find(id); it != m_children.end()) {
    if (it->second.running()) {
      it->second.try_wait();
    }
    if (!it->second.running()) {
      m_children.erase(it);
    }
  }
}

std::optional<std::map<std::string, SeenJob>> LocalScheduler::query(const std::vector<std::string>& ids) {
  ++m_counters.queries;
  std::map<std::string, SeenJob> out;
  for (const auto& id : ids) {
    auto r = record_of(id);
    if (r && alive(*r)) {
      out[id] = SeenJob{.nodes = r->nodes};
    } else {
      out[id] = SeenJob{.ended = true};
      if (r) {
        forget(id);
      }
    }
  }
  return out;
}

std::vector<std::string> LocalScheduler::jobs_named(const std::string& name) {
  ++m_counters.queries;
  std::vector<std::string> ids, names;
  {
    auto fd = records_dir(m_o);
    std::unique_ptr<DIR, int (*)(DIR*)> d(::fdopendir(::dup(fd.get())), ::closedir);
    if (!d) {
      spdlog::warn("cannot list {}: {}; jobs started but not saved before a crash are not adopted", m_o.records,
                   errno_text(errno));
      return {};
    }
    while (auto* e = ::readdir(d.get())) {
      std::string n = e->d_name;
      if (n.size() > 5 && n.ends_with(".json")) {
        names.push_back(n.substr(0, n.size() - 5));
      }
    }
  }
  for (const auto& id : names) {
    auto r = record_of(id);
    if (!r || r->id != id) {
      continue;
    }
    if (!alive(*r)) {
      forget(id);  // ended while no controller watched
    } else if (r->name == name) {
      ids.push_back(id);
    }
  }
  return ids;
}

Submitted LocalScheduler::submit(const Submission& s) {
  ++m_counters.submissions;
  Submitted res;
  auto id = local_job_id(static_cast<long>(std::time(nullptr)), static_cast<long>(::getpid()), ++m_made);
  try {
    auto dir = open_private_dir(s.output_dir, true);
    auto name = basename_of(local_output(s.output_dir, id));
    UniqueFd out(::openat(dir.get(), name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (out.get() < 0) {
      throw Error(Exit::failure, "cannot create " + local_output(s.output_dir, id) + ": " + errno_text(errno));
    }
    auto env = Env::current();
    env.set("LITHOPS_HPC_JOB_ID", id);  // the deployment's id: its status directory, as $SLURM_JOB_ID would be
    if (!s.config_path.empty()) {
      env.set("LITHOPS_HPC_CONFIG", s.config_path);
    }
    if (::geteuid() == 0) {  // Open MPI refuses root unless told (as lithops-deploy.sh does)
      env.set("OMPI_ALLOW_RUN_AS_ROOT", "1");
      env.set("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    SpawnOptions so;
    so.argv = local_argv(m_o, s);
    so.env = env;
    so.stdout_fd = out.get();
    so.stderr_fd = out.get();
    so.new_session = true;  // its own group, cut from the controller's terminal
    auto child = spawn(so);
    LocalRecord r{id, s.job_name, child.pid(), 0, s.nodes, local_output(s.output_dir, id)};
    if (auto st = read_proc_stat(child.pid())) {
      r.start_ticks = st->start_ticks;
    }
    auto rec = records_dir(m_o);
    write_file_atomic_at(rec.get(), id + ".json", to_json(r), 0600, m_o.records + "/" + id + ".json");
    m_children.emplace(id, std::move(child));
    res.job = id;
    res.output = r.output;
    res.request = "mpirun -n " + std::to_string(s.nodes) + ", no time limit";
  } catch (const Error& e) {
    // The child's handle, if one was made, kills it on the way out: no job without a record.
    res.message = e.what();
  }
  return res;
}

void LocalScheduler::cancel(const std::string& id) {
  ++m_counters.queries;
  auto r = record_of(id);
  if (!r || !alive(*r)) {
    spdlog::info("cancel {}: it has ended already", id);
    return;
  }
  if (::kill(static_cast<pid_t>(-r->pgid), SIGTERM) != 0) {
    spdlog::warn("cancel {}: SIGTERM to process group {} failed: {}", id, r->pgid, errno_text(errno));
  }
}

}  // namespace lhpc::autoalloc
