#include "gpu/memory.h"

#include <charconv>

#include "util/error.h"
#include "util/process.h"
#include "util/strings.h"

namespace lhpc::gpu {

namespace {

std::optional<std::uint64_t> mib(const std::string& text) {
  std::uint64_t n = 0;
  auto t = trim(text);
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), n);
  if (t.empty() || ec != std::errc() || end != t.data() + t.size()) {
    return std::nullopt;
  }
  return n;
}

}  // namespace

std::vector<Memory> parse_nvidia_smi(const std::string& csv) {
  std::vector<Memory> out;
  for (const auto& line : split(csv, '\n')) {
    auto f = split(line, ',');
    if (f.size() != 4) {
      continue;
    }
    auto used = mib(f[2]);
    auto total = mib(f[3]);
    if (!used || !total || trim(f[0]).empty()) {
      continue;  // "[N/A]", "[Not Supported]", a header
    }
    out.push_back({trim(f[0]), trim(f[1]), *used, *total});
  }
  return out;
}

std::vector<Memory> query_nvidia_smi(std::chrono::milliseconds limit) {
  if (!find_in_path("nvidia-smi")) {
    return {};
  }
  std::optional<RunResult> r;
  try {
    r = run_capture_within(
        {.argv = {"nvidia-smi", "--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"}},
        limit);
  } catch (const Error&) {
    return {};
  }
  return r && r->ok() ? parse_nvidia_smi(r->out) : std::vector<Memory>{};
}

std::vector<std::optional<Memory>> memory_of(const std::vector<std::vector<std::string>>& slots,
                                             const std::vector<Memory>& known) {
  std::vector<std::optional<Memory>> out;
  for (const auto& slot : slots) {
    for (const auto& id : slot) {
      std::optional<Memory> m;
      for (const auto& k : known) {
        if (k.index == id || k.uuid == id) {
          m = k;
        }
      }
      out.push_back(m);
    }
  }
  return out;
}

}  // namespace lhpc::gpu
