// libFuzzer target: the autoalloc controller's state.json through what
// `lithops-hpc status` and a restarted controller do with it:
// state_from_json, then the supply the policy derives from its jobs.
// lhpc::Error is the reader refusing the file, which is fine; anything else
// escaping (or UBSan: a float such as 1e20 converted to an integer) is a
// finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "autoalloc/controller.h"
#include "autoalloc/policy.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto s = lhpc::autoalloc::state_from_json(text, "fuzz/state.json");
    lhpc::autoalloc::Snapshot snap;
    for (const auto& r : s.jobs) {
      snap.jobs.push_back({r.id, r.phase, r.nodes, r.ready_ranks, r.slots_total, r.slots_busy});
      (void)lhpc::autoalloc::to_string(r.phase);
    }
    (void)lhpc::autoalloc::supply_of(snap);
  } catch (const lhpc::Error&) {
  }
  return 0;
}
