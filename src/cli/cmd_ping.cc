// `lithops-hpc ping [JOBID] [--count N] [--concurrency C] [--timeout S] [--expect-ranks N]`:
// broker -> dispatcher -> control handler -> reply, end to end, through every
// rank of the deployment its status file describes. Exit 0: every ping
// answered; 1: a ping unanswered in time, or fewer ranks than expected;
// 5: broker unreachable; 8: JOBID named but not found.
#include <algorithm>
#include <iostream>
#include <memory>

#include "cli/cli.h"
#include "dispatch/ping.h"
#include "health/report.h"
#include "health/status_file.h"
#include "health/view.h"

namespace lhpc::cli {

namespace {

struct PingArgs {
  dispatch::PingOptions opts;
  std::string job;
};

void fill(dispatch::PingTargets& t, const health::StatusView& view) {
  t.job = view.job;
  for (const auto& r : view.ranks) {
    t.ranks = std::max(t.ranks, r.rank + 1);
    t.nodes[r.rank] = r.node;
  }
}

// The ranks to address: those of the deployment's status file when it runs;
// none (the task queue, any rank) when there is no such deployment.
dispatch::PingTargets targets_for(const std::string& job, std::ostream& note) {
  if (!job.empty()) {
    health::check_job_id(job);
  }
  dispatch::PingTargets t;
  if (!job.empty()) {
    auto found = require_deployment(job);  // named: it must exist
    fill(t, health::parse_status(found.text, found.loc.link));
    return t;
  }
  auto look = health::find_deployment(job);
  if (look.found) {
    auto view = health::parse_status(look.found->text, look.found->loc.link);
    auto a = health::assess(view, health::unix_now());
    if (!health::ended(view.state) && !a.stale) {
      fill(t, view);
      return t;
    }
  }
  t.local_job = config::current_placeholders().jobid;
  note << "no running deployment found (looked in " << look.looked << "): pinging this job's standalone worker ("
       << t.local_job << ") if there is one, else whichever rank takes each ping from the task queue\n";
  return t;
}

}  // namespace

void register_ping(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* p = parent.add_subcommand("ping", "probe a running deployment end to end (broker, dispatcher, handler)");
  auto a = std::make_shared<PingArgs>();
  p->add_option("JOBID", a->job,
                "deployment whose every rank to ping (default: $SLURM_JOB_ID's, else the newest of yours running)");
  p->add_option("-c,--count", a->opts.count, "pings to send to each rank (default 10)")->type_name("N");
  p->add_option("--concurrency", a->opts.concurrency, "pings in flight at once (default 1)")->type_name("C");
  p->add_option("--timeout", a->opts.timeout,
                "seconds a ping may take before it counts as lost; its rank is then sent no more (default 10)")
      ->type_name("S");
  p->add_option("--expect-ranks", a->opts.expect_ranks,
                "fail unless at least N ranks answered (default: the deployment's rank count)")
      ->type_name("N");
  actions.push_back({p, [&g, a] {
                       auto cfg = load_config(g);
                       auto targets = targets_for(a->job, std::cerr);
                       return dispatch::run_ping(cfg, a->opts, targets, std::cout);
                     }});
}

}  // namespace lhpc::cli
