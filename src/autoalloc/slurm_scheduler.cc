#include "autoalloc/slurm_scheduler.h"

#include <unistd.h>

#include <spdlog/spdlog.h>
#include <cstdio>
#include <ctime>
#include <sstream>

#include "autoalloc/policy.h"
#include "autoalloc/sbatch_reply.h"
#include "gpu/slots.h"
#include "slurm/job.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/strings.h"

namespace lhpc::autoalloc {

namespace {

// Runs argv with stdout captured and stderr into a temporary file, so a
// refusal's message can be shown; never through a shell.
struct Ran {
  int code = -1;
  std::string out, err;
};
Ran run_program(const std::vector<std::string>& argv, std::optional<Env> env = std::nullopt) {
  Ran r;
  std::FILE* errf = std::tmpfile();
  if (!errf) {
    r.err = "cannot create a temporary file for stderr";
    return r;
  }
  try {
    SpawnOptions o;
    o.argv = argv;
    o.env = std::move(env);
    o.stderr_fd = ::fileno(errf);
    auto res = run_capture(o);
    r.code = res.exit_code();
    r.out = res.out;
  } catch (const Error& e) {
    r.err = e.what();
  }
  std::rewind(errf);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, errf)) > 0 && r.err.size() < 65536) {
    r.err.append(buf, n);
  }
  std::fclose(errf);
  while (!r.err.empty() && (r.err.back() == '\n' || r.err.back() == ' ')) {
    r.err.pop_back();
  }
  return r;
}

bool final_state(const slurm::JobInfo& info) { return !info.active(); }

}  // namespace

std::optional<std::map<std::string, SeenJob>> SlurmScheduler::squeue_jobs() {
  ++m_counters.queries;
  auto r = run_program({"squeue", "-h", "-u", user_name(), "-o", "%i|%T|%D|%L"});
  if (r.code != 0) {
    spdlog::warn("squeue failed ({}): {}", r.code, r.err);
    return std::nullopt;
  }
  std::map<std::string, SeenJob> out;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    auto f = split(line, '|');
    if (f.size() < 4) {
      continue;
    }
    SeenJob j;
    j.pending = f[1] == "PENDING";
    j.nodes = std::atoi(f[2].c_str());
    if (f[1] == "RUNNING") {
      j.seconds_left = parse_slurm_time(f[3]);
    }
    out[f[0]] = j;
  }
  return out;
}

std::optional<std::map<std::string, SeenJob>> SlurmScheduler::query(const std::vector<std::string>& ids) {
  std::map<std::string, SeenJob> out;
  bool unsure = !slurm::libslurm_available();
  for (const auto& id : ids) {
    if (unsure) {
      break;
    }
    ++m_counters.queries;
    auto info = slurm::job_info(id);
    if (!info) {
      unsure = true;  // forgotten, or the controller did not answer: squeue tells which
      break;
    }
    SeenJob j;
    j.pending = info->state == "PENDING";
    j.ended = final_state(*info);
    j.nodes = static_cast<int>(info->num_nodes);
    if (info->state == "RUNNING" && info->time_limit && info->end_time) {
      j.seconds_left = std::max<double>(0, static_cast<double>(*info->end_time - std::time(nullptr)));
    }
    out[id] = j;
  }
  if (!unsure) {
    return out;
  }
  auto listed = squeue_jobs();
  if (!listed) {
    return std::nullopt;
  }
  for (const auto& id : ids) {
    auto it = listed->find(id);
    out[id] = it == listed->end() ? SeenJob{.ended = true} : it->second;
  }
  return out;
}

std::vector<std::string> SlurmScheduler::jobs_named(const std::string& name) {
  ++m_counters.queries;
  auto r = run_program({"squeue", "-h", "-u", user_name(), "-n", name, "-o", "%i"});
  if (r.code != 0) {
    spdlog::warn("squeue failed ({}): {}; jobs submitted but not saved before a crash are not adopted", r.code, r.err);
    return {};
  }
  std::vector<std::string> ids;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) {
      ids.push_back(line);
    }
  }
  return ids;
}

std::string slurm_output(const std::string& dir, const std::string& id) {
  return dir + "/lithops-workers-" + id + ".out";
}

std::vector<std::string> sbatch_argv(const SlurmOptions& o, const Submission& s) {
  std::vector<std::string> argv = {"sbatch",
                                   "--parsable",
                                   "--job-name=" + s.job_name,
                                   "--nodes=" + std::to_string(s.nodes),
                                   "--time=" + o.time_limit,
                                   "--output=" + slurm_output(s.output_dir, "%j")};
  // Before the passthrough: a site's own --gres there comes later and wins.
  if (s.gpus_per_slot > 0) {
    argv.push_back(gpu::sbatch_request(s.gpu_slots, s.gpus_per_slot, o.gpu_request == config::GpuRequest::gres));
  }
  argv.insert(argv.end(), o.sbatch_args.begin(), o.sbatch_args.end());
  argv.push_back(o.script);
  if (!s.sif.empty()) {
    argv.push_back(s.sif);
  }
  if (s.gpus_per_slot > 0) {
    argv.insert(argv.end(), {"--gpus-per-slot", std::to_string(s.gpus_per_slot), "--gpu-vendor",
                             std::string(config::k_gpu_vendor_names.text(s.gpu_vendor))});
  }
  // Images are removed when the deployment ends, as `cleanup` does: a
  // retired deployment leaves nothing on its nodes.
  argv.push_back("--cleanup");
  if (!s.runtime.empty()) {
    argv.insert(argv.end(), {"--runtime", s.runtime});
  }
  return argv;
}

Submitted SlurmScheduler::submit(const Submission& s) {
  ++m_counters.submissions;
  auto env = Env::current();
  if (!s.config_path.empty()) {
    env.set("LITHOPS_HPC_CONFIG", s.config_path);
  }
  auto ran = run_program(sbatch_argv(m_o, s), env);
  auto reply = parse_sbatch_reply(ran.code, ran.out, ran.err);
  Submitted res;
  if (reply.job) {
    res.job = reply.job;
    res.output = slurm_output(s.output_dir, *reply.job);
    res.request = "-N " + std::to_string(s.nodes) + " --time=" + m_o.time_limit;
    return res;
  }
  res.message = reply.refusal;
  res.maybe_submitted = reply.unreadable_success;
  return res;
}

void SlurmScheduler::cancel(const std::string& id) {
  ++m_counters.queries;
  auto r = run_program({"scancel", id});
  if (r.code != 0) {
    spdlog::warn("scancel {} failed ({}): {}", id, r.code, r.err);
  }
}

}  // namespace lhpc::autoalloc
