// libFuzzer target: a stage record (<image>.stage.json, possibly written by
// someone else) through parse_record, and the round trip the next stage
// relies on: a record that parses, written back, parses to the same record.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "stage/record.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto r = lhpc::stage::parse_record(text);
  if (!r) {
    return 0;
  }
  const auto again = lhpc::stage::parse_record(lhpc::stage::to_json_text(*r));
  if (!again || again->hash_hex != r->hash_hex || again->size != r->size || !(again->stamp == r->stamp) ||
      again->source != r->source) {
    std::fprintf(stderr, "fuzz: a parsed record does not survive to_json_text and parse_record\n");
    std::abort();
  }
  return 0;
}
