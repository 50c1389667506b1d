// libFuzzer target: a SIF image's bytes through the parser stage and
// `sif inspect` use (parse_image, check_magic_bytes), then both renderings.
// lhpc::Error is the parser saying no, which is fine; anything else escaping
// (a JSON exception from bad UTF-8, a sanitizer report) is a finding.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "sif/sif.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    lhpc::sif::check_magic_bytes(bytes, "fuzz.sif");
  } catch (const lhpc::Error&) {
  }
  try {
    const auto img = lhpc::sif::parse_image(bytes, "fuzz.sif");
    (void)lhpc::sif::primary_partition(img);
    (void)lhpc::sif::format_text(img);
    (void)lhpc::sif::to_json(img).dump(2);
  } catch (const lhpc::Error&) {
  }
  return 0;
}
