// libFuzzer target: a status file's text through what `lithops-hpc status`
// does with it: parse_status, assess, render. lhpc::Error is the reader
// refusing the file, which is fine; anything else escaping is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "health/view.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto view = lhpc::health::parse_status(text, "fuzz/status.json");
    // A moment shortly after the file's own time, and a fixed one: both
    // reach the "stale" and "fresh" branches.
    for (double now : {view.updated + 1.0, 1.7e9}) {
      const auto a = lhpc::health::assess(view, now);
      (void)lhpc::health::render(view, a);
    }
  } catch (const lhpc::Error&) {
  }
  return 0;
}
