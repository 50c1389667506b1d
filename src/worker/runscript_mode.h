// Runscript mode: the image's own runscript (the stock Lithops entry point)
// run under container::Runscript's supervision, stepped by the worker's loop.
// Draining sends it SIGTERM once and watches it go, SIGKILL at the deadline.
#pragma once

#include <chrono>
#include <memory>

#include "container/runscript.h"
#include "worker/mode.h"
#include "worker/worker.h"

namespace lhpc::worker {

class RunscriptMode final : public Mode {
public:
  explicit RunscriptMode(const ModeContext& ctx);
  void prepare(container::InstanceSpec&) override {}
  void start() override;
  std::optional<Done> step(std::chrono::milliseconds max_wait) override;
  void drain() override;
  void abort() override {}  // the runscript holds no work of ours to give back
  // The runscript gets 5 s after SIGTERM, whatever `grace` says.
  void finish(std::chrono::milliseconds grace) override;
  // Nothing: finish stops the runscript; the instance's stop ends it otherwise.
  void stop() override {}
  void fill(WorkerStats& s) const override;

private:
  std::optional<Done> step_draining(std::chrono::steady_clock::time_point now);

  const ModeContext& m_ctx;
  std::unique_ptr<container::Runscript> m_runscript;
  bool m_signalled = false;
};

}  // namespace lhpc::worker
