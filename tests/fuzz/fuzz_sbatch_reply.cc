// libFuzzer target: autoalloc's reading of sbatch's reply
// (autoalloc/sbatch_reply.h), from a site's sbatch that may be any wrapper.
// Input: the first byte is the exit code (a multiple of 4: 0, so most inputs
// reach the success path), the rest is stdout, then a NUL, then stderr.
// Checked beyond "no crash": a job id is digits only and within Slurm's
// 32-bit range (it becomes a directory name and an scancel argument) and
// comes from a line of stdout; a refusal is one bounded line of printable
// ASCII that the state file (JSON) can hold.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "autoalloc/sbatch_reply.h"

namespace {

void require(bool ok) {
  if (!ok) {
    std::abort();
  }
}

void check_job(const std::string& job, std::string_view out) {
  require(!job.empty() && job.size() <= 10 && job[0] != '0');
  for (char c : job) {
    require(c >= '0' && c <= '9');
  }
  require(std::stoull(job) <= UINT32_MAX);
  require(out.find(job) != std::string_view::npos);
}

void check_refusal(const std::string& refusal) {
  require(!refusal.empty() && refusal.size() <= lhpc::autoalloc::k_reply_shown);
  for (char c : refusal) {
    auto u = static_cast<unsigned char>(c);
    require(u >= 0x20 && u < 0x7f);
  }
  (void)nlohmann::json(refusal).dump();  // throws on bad UTF-8: a crash here
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) {
    return 0;
  }
  int code = data[0] % 4 == 0 ? 0 : data[0];
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  auto nul = rest.find('\0');
  auto out = rest.substr(0, nul);
  auto err = nul == std::string_view::npos ? std::string_view() : rest.substr(nul + 1);
  auto r = lhpc::autoalloc::parse_sbatch_reply(code, out, err);
  if (r.job) {
    require(code == 0 && r.refusal.empty() && !r.unreadable_success);
    check_job(*r.job, out);
  } else {
    require(r.unreadable_success == (code == 0));
    check_refusal(r.refusal);
  }
  return 0;
}
