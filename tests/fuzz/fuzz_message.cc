// libFuzzer target: a message body as the broker delivers it (outer JSON,
// then base64, then the payload JSON), then what the dispatcher does with it.
// The last byte picks the free slots, so splits happen; the rest is the body.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "dispatch_steps.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::size_t free_slots = 1;
  if (size > 0) {
    free_slots = 1 + data[size - 1] % 8;
    --size;
  }
  lhpc::fuzz::decode_and_dispatch({reinterpret_cast<const char*>(data), size}, free_slots);
  return 0;
}
