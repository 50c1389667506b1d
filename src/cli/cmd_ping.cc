// `lithops-hpc ping [--count N] [--concurrency C] [--timeout S] [--expect-ranks N]`:
// broker -> dispatcher -> control handler -> reply, end to end. Exit 0: every
// ping answered; 1: a ping unanswered in time, or fewer ranks than expected;
// 5: broker unreachable.
#include <iostream>
#include <memory>

#include "cli/cli.h"
#include "dispatch/ping.h"

namespace lhpc::cli {

void register_ping(CLI::App& parent, Globals& g, std::vector<Action>& actions) {
  auto* p = parent.add_subcommand("ping", "probe a running deployment end to end (broker, dispatcher, handler)");
  auto o = std::make_shared<dispatch::PingOptions>();
  p->add_option("-c,--count", o->count, "pings to send (default 10)")->type_name("N");
  p->add_option("--concurrency", o->concurrency, "pings in flight at once (default 1)")->type_name("C");
  p->add_option("--timeout", o->timeout, "seconds a ping may take before it counts as lost (default 10)")
      ->type_name("S");
  p->add_option("--expect-ranks", o->expect_ranks, "fail unless at least N ranks answered")->type_name("N");
  actions.push_back({p, [&g, o] {
                       auto cfg = load_config(g);
                       return dispatch::run_ping(cfg, *o, std::cout);
                     }});
}

}  // namespace lhpc::cli
