// health-driver: N MPI ranks that play a deployment's health part with
// scripted states (no image, no broker, no workers), so the MPI transport,
// the status file, `status` and `stop` can be tested end to end. Each rank
// goes staging -> starting -> ready, counts fake tasks, drains on a stop
// request (rank 0), a drain command, SIGTERM or SIGINT, then runs the
// shutdown exchange exactly as `deploy` does (health::Session::finish).
//
//   mpirun -np 3 health-driver --job J --interval 0.5 [--ready-after S]
//       [--drain S] [--finish-timeout S] [--fail-rank R] [--fake-nodes]
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "config/config.h"
#include "health/memory.h"
#include "health/session.h"
#include "util/error.h"
#include "util/log.h"
#include "util/mpi.h"
#include "util/signals.h"

using namespace lhpc;

namespace {

struct Args {
  std::string job = "driver";
  std::string status_file;
  double interval = 0.5;
  double ready_after = 0.5;
  double drain = 0.3;
  double finish_timeout = 10;
  int fail_rank = -1;
  bool fake_nodes = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "health-driver: " << why << "\n"
            << "usage: health-driver --job J [--interval S] [--status-file F] [--ready-after S] [--drain S]\n"
            << "       [--finish-timeout S] [--fail-rank R] [--fake-nodes]\n";
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage(k + " needs a value");
      }
      return argv[++i];
    };
    if (k == "--job") {
      a.job = val();
    } else if (k == "--status-file") {
      a.status_file = val();
    } else if (k == "--interval") {
      a.interval = std::stod(val());
    } else if (k == "--ready-after") {
      a.ready_after = std::stod(val());
    } else if (k == "--drain") {
      a.drain = std::stod(val());
    } else if (k == "--finish-timeout") {
      a.finish_timeout = std::stod(val());
    } else if (k == "--fail-rank") {
      a.fail_rank = std::stoi(val());
    } else if (k == "--fake-nodes") {
      a.fake_nodes = true;
    } else {
      usage("unknown option " + k);
    }
  }
  return a;
}

double mono() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  try {
    setup_logging("info");
    MpiSession mpi(&argc, &argv);
    Args args = parse(argc, argv);
    std::string node = args.fake_nodes ? fmt::format("n{}", mpi.rank() + 1) : config::current_placeholders().node;
    set_log_prefix(fmt::format("rank {} {}", mpi.rank(), node));

    health::Session h(mpi.world(),
                      {.job = args.job, .interval = args.interval, .status_file = args.status_file, .node = node});
    SignalPipe signals({SIGINT, SIGTERM});

    const double t0 = mono();
    double next_report = t0;
    double drain_until = -1;
    health::Report r;
    r.slots_total = 4;

    auto begin_drain = [&](const char* why) {
      if (drain_until >= 0) {
        return;
      }
      spdlog::info("draining ({})", why);
      drain_until = mono() + args.drain;
      if (h.is_root()) {
        h.set_state(health::DeploymentState::draining);
        h.broadcast(health::Command::drain);
      }
    };

    while (true) {
      pollfd p{.fd = signals.fd(), .events = POLLIN};
      if (::poll(&p, 1, 20) > 0) {
        for (int s : signals.drain()) {
          begin_drain(::strsignal(s));
        }
      }
      for (auto c : h.poll()) {
        begin_drain(health::k_command_names.text(c).data());
      }
      if (h.is_root() && h.stop_requested()) {
        begin_drain("lithops-hpc stop");
      }
      double now = mono();
      if (drain_until >= 0 && now >= drain_until) {
        break;
      }
      if (now < next_report) {
        continue;
      }
      next_report = now + args.interval;
      double up = now - t0;
      if (drain_until >= 0) {
        r.state = health::State::draining;
        r.slots_busy = 0;
      } else if (mpi.rank() == args.fail_rank && up >= args.ready_after) {
        r.state = health::State::failed;
        health::set_last_error(r, "instance lithops-worker-" + args.job +
                                      " died 5 times; last: cannot reach amqp://rig:s3cret@127.0.0.1:5672/v1");
      } else if (up >= args.ready_after) {
        r.state = health::State::ready;
        r.slots_busy = mpi.rank() % 3;
        r.done += 2;
        r.failed = r.done / 10;
        r.requeued = mpi.rank();
        r.broker_connected = 1;
        r.instance_alive = 1;
      } else {
        r.state = up >= args.ready_after / 2 ? health::State::starting : health::State::staging;
      }
      auto m = health::read_memory();
      r.rss_kb = m.self_kb;
      r.rss_tree_kb = m.tree_kb;
      r.uptime = up;
      h.report(r);
    }

    r.slots_busy = 0;
    auto end = h.finish(r, args.finish_timeout);
    if (!end.clean) {
      mpi.abort(Exit::failure);
    }
    spdlog::info("stopped cleanly");
    return 0;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return static_cast<int>(e.code());
  }
}
