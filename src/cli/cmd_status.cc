// `lithops-hpc status [--json] [--watch [SECONDS]] [JOBID]`: the health of a
// deployment from its status file; without a job id (and outside a job)
// every deployment of the user, one line each, and the autoalloc
// controller's line (autoalloc/overview.h). Exit 0: running and every rank ready;
// 1: degraded (a rank not ready, unresponsive, rank 0 gone, or ended);
// 8: no deployment found (exit codes: lithops-hpc(1)).
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "autoalloc/controller.h"
#include "autoalloc/overview.h"
#include "cli/cli.h"
#include "health/report.h"
#include "health/status_file.h"
#include "health/view.h"
#include "services/up.h"
#include "util/error.h"
#include "util/signals.h"

namespace lhpc::cli {

namespace {

struct StatusOpts {
  std::string job;
  bool json = false;
  bool all = false;   // ended deployments of every age
  std::string watch;  // seconds; empty with --watch given: the default
};

constexpr double k_default_watch = 2;

// Every deployment and the controller; the same exit codes as one deployment.
Exit show_overview(const StatusOpts& o) {
  auto now = health::unix_now();
  auto seen = o.json ? autoalloc::overview_json(now, o.all) : autoalloc::overview_text(now, o.all);
  if (seen.code == Exit::no_deployment) {
    require_deployment(o.job);  // throws the usual "no deployment found", naming where it looked
  }
  std::cout << seen.text;
  std::cout.flush();
  return seen.code;
}

// Without a job id (and outside a job): the overview when there is more to
// show than one deployment (several, or the autoalloc controller); a lone
// deployment gets its table, as `status` always showed it.
bool overview_wanted(const StatusOpts& o) {
  if (!o.job.empty() || health::job_from_environment()) {
    return false;
  }
  return o.all || autoalloc::load_state().has_value() || autoalloc::deployments(health::unix_now()).size() > 1;
}

// One look at the deployment; returns the exit code this look deserves.
Exit show_once(const StatusOpts& o, bool watching) {
  bool services = false;
  if (!o.json && o.job.empty() && !health::job_from_environment()) {
    if (auto line = services::status_line("task_queue")) {
      std::cout << *line << "\n";  // above the deployments: what they all need
      services = true;
    }
  }
  if (overview_wanted(o)) {
    return show_overview(o);
  }
  if (services && !health::find_deployment("").found) {
    std::cout << "no deployment\n";  // the services line said what there is; not an error
    std::cout.flush();
    return Exit::no_deployment;
  }
  auto f = require_deployment(o.job);
  auto view = health::parse_status(f.text, f.loc.link);
  auto a = health::assess(view, health::unix_now());
  if (o.json) {
    if (watching) {
      // One document per line (JSON Lines), so a reader can split the stream.
      std::cout << nlohmann::ordered_json::parse(f.text).dump() << "\n";
    } else {
      std::cout << f.text;
      if (!f.text.empty() && f.text.back() != '\n') {
        std::cout << "\n";
      }
    }
  } else {
    std::cout << health::render(view, a);
  }
  std::cout.flush();
  return a.code;
}

Exit run_status(const StatusOpts& o, bool watch_given) {
  if (!o.job.empty()) {
    health::check_job_id(o.job);
  }
  if (!watch_given) {
    return show_once(o, false);
  }
  double every = k_default_watch;
  if (!o.watch.empty()) {
    try {
      std::size_t used = 0;
      every = std::stod(o.watch, &used);
      if (used != o.watch.size() || every <= 0) {
        throw std::invalid_argument("bad");
      }
    } catch (const std::exception&) {
      throw Error(Exit::usage, "--watch takes a number of seconds above 0, not '" + o.watch + "'",
                  "write --watch 5 JOBID, or put JOBID first: status JOBID --watch");
    }
    // `status --watch 12345` reads the job id as seconds: refuse rather than
    // redraw every three hours.
    if (every > 3600) {
      throw Error(Exit::usage, "--watch " + o.watch + " would redraw every " + o.watch + " s",
                  "to watch job " + o.watch + ", put the job id first: lithops-hpc status " + o.watch + " --watch");
    }
  }
  SignalPipe signals({SIGINT, SIGTERM});
  bool tty = ::isatty(STDOUT_FILENO) && !o.json;
  while (true) {
    if (tty) {
      std::cout << "\033[H\033[2J";  // home, clear screen
    }
    try {
      show_once(o, true);
    } catch (const Error& e) {
      spdlog::warn("{}", e.what());  // not the end of watching: rank 0 may fix it next interval
    }
    if (!tty && !o.json) {
      std::cout << "\n";
    }
    std::cout.flush();
    pollfd p{.fd = signals.fd(), .events = POLLIN};
    if (::poll(&p, 1, static_cast<int>(every * 1000)) > 0) {
      auto got = signals.drain();
      return exit_for_signal(got.empty() ? SIGINT : got.back());
    }
  }
}

}  // namespace

void register_status(CLI::App& parent, Globals&, std::vector<Action>& actions) {
  auto o = std::make_shared<StatusOpts>();
  auto* st = parent.add_subcommand("status", "table of a deployment's ranks, nodes and their health");
  st->add_option("JOBID", o->job,
                 "deployment to show (default: $SLURM_JOB_ID's; else your one deployment, or one line per deployment "
                 "of yours and the autoalloc controller's)");
  st->add_flag("--json", o->json, "print the status file's JSON (see STATUS FILE in lithops-hpc(1))");
  st->add_flag("--all", o->all,
               "without JOBID: also the deployments that ended over an hour ago (health.keep_ended prunes them)");
  auto* watch = st->add_option("--watch", o->watch, "redraw every SECONDS (default 2) until Ctrl-C")
                    ->expected(0, 1)
                    ->type_name("[SECONDS]");
  actions.push_back({st, [o, watch] { return run_status(*o, watch->count() > 0); }});
}

}  // namespace lhpc::cli
