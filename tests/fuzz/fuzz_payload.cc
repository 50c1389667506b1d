// libFuzzer target: the inner layer alone. The input is the payload JSON; it
// is wrapped the way the Lithops client publishes it ({"action", base64}) so
// mutations reach the payload's structure instead of breaking the base64.
// The first byte picks the action and the free slots.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dispatch_steps.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) {
    return 0;
  }
  const std::uint8_t pick = data[0];
  const char* action = (pick & 0x30) == 0x10 ? "get_metadata" : ((pick & 0x30) == 0x20 ? "ping" : "send_task");
  const std::size_t free_slots = 1 + (pick & 0x07);
  const std::string_view payload(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::string body =
      std::string("{\"action\":\"") + action + "\",\"payload\":\"" + lhpc::dispatch::base64_encode(payload) + "\"}";
  lhpc::fuzz::decode_and_dispatch(body, free_slots);
  return 0;
}
