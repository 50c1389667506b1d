// `lithops-hpc stop [JOBID] [--timeout S]`: asks a deployment to drain and
// stop by writing <job dir>/stop, which rank 0 checks every health interval
// (the file works from any node sharing the home directory; no signal is
// sent, see lithops-hpc(1)), then waits until the status file says stopped.
// `--all`: every running deployment of the user at once.
// Exit 0: stopped (or asked, with --timeout 0); 1: not stopped in time or
// ended failed; 8: no deployment found (exit codes: lithops-hpc(1)).
#include <algorithm>
#include <cmath>
#include <iostream>
#include <memory>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "autoalloc/controller.h"
#include "autoalloc/overview.h"
#include "cli/cli.h"
#include "health/report.h"
#include "health/status_file.h"
#include "health/view.h"
#include "util/error.h"

namespace lhpc::cli {

namespace {

struct StopOpts {
  std::string job;
  double timeout = 120;
  bool all = false;
};

int count_stopped(const health::StatusView& v) {
  int n = 0;
  for (const auto& r : v.ranks) {
    n += r.state == health::State::stopped ? 1 : 0;
  }
  return n;
}

std::string progress_line(const health::StatusView& v) {
  return fmt::format("job {}: {}, {}/{} ranks stopped", v.job, health::k_deployment_state_names.text(v.state),
                     count_stopped(v), v.ranks.size());
}

// Polls the status file until the deployment stopped (returns) or failed or
// the deadline passed (throws).
void wait_stopped(const health::Location& loc, health::StatusView view, double timeout) {
  double deadline = health::unix_now() + timeout;
  std::string last_line;
  while (true) {
    auto look = health::find_deployment(loc.job);
    if (look.found) {
      try {
        view = health::parse_status(look.found->text, loc.link);
      } catch (const Error&) {
        // keep the previous view: the next rewrite will be whole
      }
    }
    auto line = progress_line(view);
    if (line != last_line) {
      std::cout << line << "\n";
      std::cout.flush();
      last_line = line;
    }
    if (view.state == health::DeploymentState::stopped) {
      std::cout << health::assess(view, health::unix_now()).headline << "\n";
      return;
    }
    if (view.state == health::DeploymentState::failed) {
      throw Error(Exit::failure, "job " + view.job + " ended failed: a rank did not stop",
                  "see the job's batch log for the rank that failed");
    }
    if (health::unix_now() >= deadline) {
      throw Error(Exit::failure, fmt::format("job {} did not stop within {:g} s ({})", view.job, timeout, line),
                  "the request stays in " + loc.stop + ": run stop again to keep waiting, or scancel the job");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
}

}  // namespace

Exit stop_all_deployments(double timeout) {
  auto live = autoalloc::live_deployments(health::unix_now());
  if (live.empty()) {
    require_deployment("");  // throws "no deployment found" when there is none at all
    std::cout << "no running deployment\n";
    return Exit::ok;
  }
  if (auto st = autoalloc::load_state(); st && st->controller == "running") {
    spdlog::warn(
        "the autoalloc controller (pid {} on {}) is running: it submits again while tasks wait; "
        "end it first (SIGTERM) to keep the deployments stopped",
        st->pid, st->host);
  }
  for (const auto& d : live) {
    health::request_stop(d.found.loc);
    std::cout << "stop requested for job " << d.view.job << "\n";
  }
  std::cout.flush();
  if (timeout == 0) {
    return Exit::ok;
  }
  // Every deployment gets its wait; those that did not stop are reported
  // together at the end, through main like every error.
  double deadline = health::unix_now() + timeout;
  std::vector<Error> missed;
  for (const auto& d : live) {
    try {
      wait_stopped(d.found.loc, d.view, std::max(0.0, deadline - health::unix_now()));
    } catch (const Error& e) {
      missed.push_back(e);
    }
  }
  if (missed.empty()) {
    return Exit::ok;
  }
  if (missed.size() == 1) {
    throw missed.front();
  }
  std::string what = fmt::format("{} of {} deployments did not stop", missed.size(), live.size());
  for (const auto& e : missed) {
    what += std::string("; ") + e.what();
  }
  throw Error(Exit::failure, what, missed.front().hint());
}

namespace {

Exit run_stop_all(const StopOpts& o) { return stop_all_deployments(o.timeout); }

Exit run_stop(const StopOpts& o) {
  if (o.all) {
    if (!o.job.empty()) {
      throw Error(Exit::usage, "stop --all takes no JOBID", "give either --all or a job id");
    }
    return run_stop_all(o);
  }
  if (!o.job.empty()) {
    health::check_job_id(o.job);
  }
  if (o.timeout < 0 || !std::isfinite(o.timeout)) {
    throw Error(Exit::usage, "--timeout takes seconds, 0 or more", "0 asks for the stop without waiting");
  }
  auto found = require_deployment(o.job);
  const auto& loc = found.loc;
  auto view = health::parse_status(found.text, loc.link);
  if (view.state == health::DeploymentState::stopped) {
    std::cout << "job " << view.job << " is already stopped\n";
    return Exit::ok;
  }
  if (view.state == health::DeploymentState::failed) {
    throw Error(Exit::failure, "job " + view.job + " already ended: failed",
                "see the job's batch log; `lithops-hpc status " + view.job + "` shows its last report");
  }
  auto a = health::assess(view, health::unix_now());
  if (a.stale) {
    spdlog::warn("{}; the stop request waits for it in {}", a.headline, loc.stop);
  }
  health::request_stop(loc);
  if (o.timeout == 0) {
    std::cout << "stop requested for job " << view.job << " (" << loc.stop << ")\n";
    return Exit::ok;
  }
  std::cout << fmt::format("stop requested for job {}; waiting up to {:g} s (rank 0 looks every {:g} s)\n", view.job,
                           o.timeout, view.interval);
  std::cout.flush();
  wait_stopped(loc, view, o.timeout);
  return Exit::ok;
}

}  // namespace

void register_stop(CLI::App& parent, Globals&, std::vector<Action>& actions) {
  auto o = std::make_shared<StopOpts>();
  auto* st = parent.add_subcommand("stop", "drain and stop a running deployment");
  st->add_option("JOBID", o->job,
                 "deployment to stop (default: $SLURM_JOB_ID's, else the newest of yours under the state dir)");
  st->add_flag("--all", o->all, "every running deployment of yours");
  st->add_option("--timeout", o->timeout, "seconds to wait for every rank to stop (default 120; 0: do not wait)")
      ->type_name("S");
  actions.push_back({st, [o] { return run_stop(*o); }});
}

}  // namespace lhpc::cli
