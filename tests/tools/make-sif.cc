// Test helper, independent of lithops-hpc's CLI: writes a valid SIF image of
// an exact size (tests/unit/sif_fixtures), so integration tests and
// benchmarks can make images without apptainer.
//   make-sif PATH [SIZE]   SIZE in bytes, or with a K/M/G suffix (KiB, MiB,
//                          GiB); omitted or 0: the smallest valid image
//   make-sif --min-size    prints the smallest valid size in bytes
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

#include "tests/unit/sif_fixtures.h"

namespace {
std::uint64_t parse_size(const std::string& s) {
  std::size_t end = 0;
  std::uint64_t v = std::stoull(s, &end);
  std::string unit = s.substr(end);
  if (unit.empty()) {
    return v;
  }
  switch (unit[0]) {
    case 'K':
    case 'k': return v << 10;
    case 'M':
    case 'm': return v << 20;
    case 'G':
    case 'g': return v << 30;
    default: throw std::invalid_argument("unknown size suffix '" + unit + "'");
  }
}
}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "--min-size") {
      std::printf("%zu\n", lhpc::test::min_sif_size());
      return 0;
    }
    if (argc < 2 || argc > 3) {
      std::fprintf(stderr, "usage: make-sif PATH [SIZE[K|M|G]] | make-sif --min-size\n");
      return 2;
    }
    lhpc::test::FixtureSpec spec;
    spec.total_size = argc == 3 ? parse_size(argv[2]) : 0;
    lhpc::test::write_sif(argv[1], spec);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make-sif: %s\n", e.what());
    return 1;
  }
}
