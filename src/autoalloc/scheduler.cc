#include "autoalloc/scheduler.h"

#include <unistd.h>

#include <spdlog/spdlog.h>
#include <cstdio>
#include <ctime>
#include <sstream>

#include "autoalloc/policy.h"
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

std::optional<std::map<std::string, SeenJob>> squeue_jobs(unsigned long long& queries) {
  ++queries;
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

bool final_state(const slurm::JobInfo& info) { return !info.active(); }

}  // namespace

std::optional<std::map<std::string, SeenJob>> query_jobs(const std::vector<std::string>& ids,
                                                         unsigned long long& queries) {
  std::map<std::string, SeenJob> out;
  bool unsure = !slurm::libslurm_available();
  for (const auto& id : ids) {
    if (unsure) {
      break;
    }
    ++queries;
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
  auto listed = squeue_jobs(queries);
  if (!listed) {
    return std::nullopt;
  }
  for (const auto& id : ids) {
    auto it = listed->find(id);
    out[id] = it == listed->end() ? SeenJob{.ended = true} : it->second;
  }
  return out;
}

std::vector<std::string> jobs_named(const std::string& name) {
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

std::vector<std::string> sbatch_argv(const SubmitRequest& r) {
  std::vector<std::string> argv = {"sbatch",
                                   "--parsable",
                                   "--job-name=" + r.job_name,
                                   "--nodes=" + std::to_string(r.nodes),
                                   "--time=" + r.time_limit,
                                   "--output=" + r.output};
  argv.insert(argv.end(), r.sbatch_args.begin(), r.sbatch_args.end());
  argv.push_back(r.script);
  if (!r.sif.empty()) {
    argv.push_back(r.sif);
  }
  // Images are removed when the deployment ends, as `cleanup` does: a
  // retired deployment leaves nothing on its nodes.
  argv.push_back("--cleanup");
  return argv;
}

SubmitResult sbatch(const SubmitRequest& r) {
  auto env = Env::current();
  if (!r.config_path.empty()) {
    env.set("LITHOPS_HPC_CONFIG", r.config_path);
  }
  auto ran = run_program(sbatch_argv(r), env);
  SubmitResult res;
  auto out = trim(ran.out);
  if (ran.code == 0 && !out.empty()) {
    res.job = out.substr(0, out.find(';'));  // --parsable: "id" or "id;cluster"
    res.message = out;
    return res;
  }
  res.message = ran.err.empty() ? "sbatch exited with code " + std::to_string(ran.code) : ran.err;
  return res;
}

void cancel_job(const std::string& id) {
  auto r = run_program({"scancel", id});
  if (r.code != 0) {
    spdlog::warn("scancel {} failed ({}): {}", id, r.code, r.err);
  }
}

}  // namespace lhpc::autoalloc
