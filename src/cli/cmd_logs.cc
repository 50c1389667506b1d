// `lithops-hpc logs [JOBID] [--rank N] [--follow] [--raw]`: a deployment's handler
// output (Lithops' logging, what functions print), which goes to per-rank
// files rather than the job output (logs.dir). Each line is prefixed with
// its rank. Exit 0: every selected rank's log was read; 1: some are not on
// this machine (node-local logs of other nodes; where they are goes to
// stderr); 8: no such job, no log record for it, or no such rank.
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <optional>

#include "cli/cli.h"
#include "health/report.h"
#include "health/status_file.h"
#include "health/view.h"
#include "logs/place.h"
#include "logs/reader.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/signals.h"

namespace lhpc::cli {

namespace {

struct LogsOpts {
  std::string job;
  int rank = -1;
  bool follow = false;
  bool raw = false;
};

const char* k_no_job_hint =
    "name its job id (lithops-hpc status lists them); LITHOPS_HPC_STATE_DIR must be the same as the deployment's";

// The job `logs` means without one: the environment's, the newest
// deployment's, else the newest `lithops-hpc worker`'s.
std::string resolve_job(const std::string& job) {
  if (!job.empty()) {
    health::check_job_id(job);
    return job;
  }
  if (auto env = health::job_from_environment()) {
    return *env;
  }
  if (auto look = health::find_deployment(""); look.found) {
    return look.found->loc.job;
  }
  if (auto newest = logs::newest_record_job()) {
    return *newest;
  }
  throw Error(Exit::no_deployment, "no deployment found (looked in " + state_dir() + "/jobs)", k_no_job_hint);
}

// The deployment is over (stopped, failed, or rank 0 gone): --follow ends.
// A job without a status file (`lithops-hpc worker`) never ends here.
bool ended(const std::string& job) {
  try {
    auto look = health::find_deployment(job);
    if (!look.found) {
      return false;
    }
    auto view = health::parse_status(look.found->text, look.found->loc.link);
    return health::ended(view.state) || health::assess(view, health::unix_now()).stale;
  } catch (const Error&) {
    return false;  // half a file or a transient problem: look again
  }
}

void say_missing(const logs::Record& rec, const logs::Reader& reader, bool yet) {
  for (int r : reader.missing()) {
    std::string where = rec.where == "node"
                            ? " (node-local: read it on " + rec.nodes.at(static_cast<std::size_t>(r)) +
                                  ", e.g. srun --jobid " + rec.job + " -w " +
                                  rec.nodes.at(static_cast<std::size_t>(r)) + " --overlap lithops-hpc logs " + rec.job +
                                  " --rank " + std::to_string(r) + ")"
                            : "";
    std::cerr << "lithops-hpc logs: " << reader.describe(r) << ": not " << (yet ? "(yet) " : "") << "on this machine"
              << where << "\n";
  }
}

Exit run_logs(const LogsOpts& o, bool rank_given) {
  auto job = resolve_job(o.job);
  auto rec = logs::read_record(job);
  if (!rec) {
    throw Error(
        Exit::no_deployment,
        "no handler logs recorded for job " + job + " (looked for " + state_dir() + "/jobs/" + job + "/logs.json)",
        k_no_job_hint);
  }
  logs::Reader reader(*rec, rank_given ? std::optional<int>(o.rank) : std::nullopt);
  reader.escape_for_terminal(!o.raw && ::isatty(STDOUT_FILENO) == 1);
  if (!o.follow) {
    reader.pump(std::cout, true);
    say_missing(*rec, reader, false);
    return reader.missing().empty() ? Exit::ok : Exit::failure;
  }
  SignalPipe signals({SIGINT, SIGTERM});
  reader.pump(std::cout);
  say_missing(*rec, reader, true);
  auto next_look = std::chrono::steady_clock::now();
  while (true) {
    pollfd p{.fd = signals.fd(), .events = POLLIN};
    if (::poll(&p, 1, 250) > 0) {
      auto got = signals.drain();
      reader.pump(std::cout, true);
      return exit_for_signal(got.empty() ? SIGINT : got.back());
    }
    bool over = false;
    if (std::chrono::steady_clock::now() >= next_look) {
      over = ended(job);
      next_look = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    }
    reader.pump(std::cout, over);
    if (over) {
      return reader.missing().empty() ? Exit::ok : Exit::failure;
    }
  }
}

}  // namespace

void register_logs(CLI::App& parent, Globals&, std::vector<Action>& actions) {
  auto o = std::make_shared<LogsOpts>();
  auto* lg =
      parent.add_subcommand("logs", "a deployment's handler output (Lithops' logging, function prints), by rank");
  lg->add_option("JOBID", o->job,
                 "deployment to read (default: $SLURM_JOB_ID's; else your newest deployment or worker)");
  auto* rank = lg->add_option("--rank", o->rank, "only this rank's log")->type_name("N");
  lg->add_flag("-f,--follow", o->follow, "keep printing new lines until the deployment ends (or Ctrl-C)");
  lg->add_flag("--raw", o->raw,
               "print control characters as written (default on a terminal: as \\xNN, so no escape sequence "
               "reaches it)");
  actions.push_back({lg, [o, rank] { return run_logs(*o, rank->count() > 0); }});
}

}  // namespace lhpc::cli
