// Runscript mode: the image's own runscript (the stock Lithops entry point)
// run under container::Runscript's supervision, stepped by the worker's loop.
// Draining sends it SIGTERM once and watches it go, SIGKILL at the deadline.
#pragma once

#include <chrono>
#include <memory>

#include "container/runscript.h"
#include "worker/worker.h"

namespace lhpc::worker {

class RunscriptMode {
public:
  explicit RunscriptMode(Worker& w);
  void start();
  void step(std::chrono::milliseconds max_wait);
  void finish();
  void fill(WorkerStats& s) const;

private:
  void step_draining(std::chrono::steady_clock::time_point now);

  Worker& w;
  std::unique_ptr<container::Runscript> m_runscript;
  bool m_signalled = false;
};

}  // namespace lhpc::worker
