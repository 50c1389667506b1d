// Writes the SIF seeds of tests/fuzz/corpus/sif/ from tests/unit/sif_fixtures
// (the images the unit tests use: valid, each kind of damage, and one with
// many used descriptors so the fuzzer starts past the first read of the
// table). Deterministic. Built by a g++ build with tests on:
//   build/tests/fuzz/make-sif-seeds tests/fuzz/corpus/sif
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "tests/unit/sif_fixtures.h"

namespace {

using lhpc::test::FixtureSpec;
using lhpc::test::SifCorruption;

constexpr std::size_t k_descriptor = 585;
constexpr std::size_t k_used = 4;
constexpr std::size_t k_id = 5;
constexpr std::size_t k_name = 73;

// Every slot of the table used: copies of the definition-file descriptor
// with ids of their own and a name each, all pointing at the same bytes.
std::string many_descriptors(std::uint32_t count) {
  FixtureSpec spec;
  spec.descriptor_capacity = count;
  std::string image = lhpc::test::make_sif(spec);
  const auto first = lhpc::test::descriptor_pos(spec, 0);
  const std::string deffile = image.substr(first, k_descriptor);
  for (std::uint32_t i = 2; i < count; ++i) {
    const auto pos = lhpc::test::descriptor_pos(spec, i);
    image.replace(pos, k_descriptor, deffile);
    image[pos + k_used] = 1;
    lhpc::test::put_le(image, pos + k_id, i + 1, 4);
    const std::string name = "object-" + std::to_string(i);
    image.replace(pos + k_name, name.size(), name);
  }
  return image;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make-sif-seeds DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  try {
    std::vector<std::pair<std::string, std::string>> seeds;
    seeds.emplace_back("minimal", lhpc::test::make_sif(0));
    FixtureSpec at4096;
    at4096.descriptors_offset = 4096;
    at4096.arch = "04";
    seeds.emplace_back("table-at-4096-arm64", lhpc::test::make_sif(at4096));
    FixtureSpec odd;
    odd.partition_name = std::string("r\x01oot\xff\xc3\xa9", 8);
    odd.fs_type = 99;
    odd.part_type = 4;
    seeds.emplace_back("odd-names-and-types", lhpc::test::make_sif(odd));
    const std::pair<const char*, SifCorruption> damaged[] = {
        {"wrong-magic", SifCorruption::wrong_magic},
        {"truncated-header", SifCorruption::truncated_header},
        {"bad-version", SifCorruption::bad_version},
        {"payload-truncated", SifCorruption::payload_truncated},
        {"offset-beyond-eof", SifCorruption::offset_beyond_eof},
        {"size-overflow", SifCorruption::size_overflow},
        {"table-beyond-eof", SifCorruption::table_beyond_eof},
        {"table-too-small", SifCorruption::table_too_small},
        {"zero-descriptors", SifCorruption::zero_descriptors},
        {"no-used-descriptors", SifCorruption::no_used_descriptors},
    };
    for (const auto& [name, c] : damaged) {
      FixtureSpec spec;
      spec.corruption = c;
      seeds.emplace_back(name, lhpc::test::make_sif(spec));
    }
    seeds.emplace_back("1000-descriptors", many_descriptors(1000));
    for (const auto& [name, bytes] : seeds) {
      lhpc::test::write_bytes(dir + "/" + name, bytes);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make-sif-seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
