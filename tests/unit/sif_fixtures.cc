// SIF fixture builder: see sif_fixtures.h. Field offsets are written out
// here on purpose rather than shared with src/sif, so a wrong offset in the
// reader cannot be cancelled by the same mistake in the writer.
#include "tests/unit/sif_fixtures.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "util/fd.h"

namespace lhpc::test {

namespace {

constexpr std::size_t k_header = 128;
constexpr std::size_t k_descriptor = 585;
constexpr std::uint32_t k_group_flag = 0xf0000000U;
constexpr std::uint64_t k_truncated_header_size = 100;

std::uint64_t table_size(const FixtureSpec& spec) { return std::uint64_t{spec.descriptor_capacity} * k_descriptor; }

std::uint64_t data_offset(const FixtureSpec& spec) { return spec.descriptors_offset + table_size(spec); }

std::uint64_t total_of(const FixtureSpec& spec) { return spec.total_size != 0 ? spec.total_size : min_sif_size(spec); }

void put_bytes(std::string& image, std::size_t off, const std::string& s, std::size_t max) {
  std::memcpy(image.data() + off, s.data(), std::min(s.size(), max));
}

// One used descriptor, as descriptor.go's rawDescriptor lays it out.
void put_descriptor(std::string& image, std::size_t at, std::int32_t type, std::uint32_t id, std::uint64_t offset,
                    std::uint64_t size, const std::string& name) {
  put_le(image, at + 0, static_cast<std::uint32_t>(type), 4);
  image[at + 4] = 1;  // used
  put_le(image, at + 5, id, 4);
  put_le(image, at + 9, 1U | k_group_flag, 4);  // group 1, as apptainer's default group
  put_le(image, at + 13, 0, 4);                 // no link
  put_le(image, at + 17, offset, 8);
  put_le(image, at + 25, size, 8);
  put_le(image, at + 33, size, 8);  // size with padding: no alignment here
  put_le(image, at + 41, k_fixture_created, 8);
  put_le(image, at + 49, k_fixture_created, 8);
  put_bytes(image, at + 73, name, 128);
}

// Everything before the partition data: header, table, definition file.
std::string make_prefix(const FixtureSpec& spec) {
  if (spec.descriptor_capacity < 2) {
    throw std::invalid_argument("make_sif: descriptor_capacity must be at least 2");
  }
  if (spec.descriptors_offset < k_header) {
    throw std::invalid_argument("make_sif: descriptors_offset must be at least 128");
  }
  const std::uint64_t total = total_of(spec);
  if (total < min_sif_size(spec)) {
    throw std::invalid_argument("make_sif: total_size " + std::to_string(total) + " is below the smallest image, " +
                                std::to_string(min_sif_size(spec)) + " bytes");
  }
  const std::uint64_t data = data_offset(spec);
  const std::uint64_t part = partition_offset(spec);
  std::string image(part, '\0');

  put_bytes(image, 0, "#!/usr/bin/env run-singularity\n", 32);
  put_bytes(image, 32, std::string("SIF_MAGIC\0", 10), 10);
  put_bytes(image, 42, std::string("01\0", 3), 3);
  put_bytes(image, 45, spec.arch, 3);
  for (std::size_t i = 0; i < 16; ++i) {
    image[48 + i] = static_cast<char>(i);
  }
  put_le(image, 64, k_fixture_created, 8);
  put_le(image, 72, k_fixture_modified, 8);
  put_le(image, 80, spec.descriptor_capacity - 2, 8);  // free
  put_le(image, 88, spec.descriptor_capacity, 8);      // total
  put_le(image, 96, spec.descriptors_offset, 8);
  put_le(image, 104, table_size(spec), 8);
  put_le(image, 112, data, 8);
  put_le(image, 120, total - data, 8);

  const std::size_t d0 = descriptor_pos(spec, 0);
  const std::size_t d1 = descriptor_pos(spec, 1);
  put_descriptor(image, d0, 0x4001, k_deffile_id, data, spec.deffile.size(), "");
  put_descriptor(image, d1, 0x4004, k_partition_id, part, total - part, spec.partition_name);
  put_le(image, d1 + 201, static_cast<std::uint32_t>(spec.fs_type), 4);
  put_le(image, d1 + 205, static_cast<std::uint32_t>(spec.part_type), 4);
  put_bytes(image, d1 + 209, spec.arch, 3);
  put_bytes(image, data, spec.deffile, spec.deffile.size());

  switch (spec.corruption) {
    case SifCorruption::none:
    case SifCorruption::truncated_header: break;
    case SifCorruption::wrong_magic: put_bytes(image, 32, "SIF_MAGIX", 9); break;
    case SifCorruption::bad_version: put_bytes(image, 42, "02", 2); break;
    case SifCorruption::payload_truncated: put_le(image, d1 + 25, total - part + 1, 8); break;
    case SifCorruption::offset_beyond_eof: put_le(image, d1 + 17, total + 4096, 8); break;
    case SifCorruption::size_overflow:
      put_le(image, d1 + 25, static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), 8);
      break;
    case SifCorruption::table_beyond_eof: put_le(image, 96, total + 1, 8); break;
    case SifCorruption::table_too_small: put_le(image, 104, table_size(spec) - k_descriptor, 8); break;
    case SifCorruption::zero_descriptors:
      put_le(image, 80, 0, 8);
      put_le(image, 88, 0, 8);
      break;
    case SifCorruption::no_used_descriptors:
      image[d0 + 4] = 0;
      image[d1 + 4] = 0;
      put_le(image, 80, spec.descriptor_capacity, 8);
      break;
  }
  return image;
}

}  // namespace

std::size_t min_sif_size(const FixtureSpec& spec) { return static_cast<std::size_t>(partition_offset(spec)); }

std::uint64_t partition_offset(const FixtureSpec& spec) { return data_offset(spec) + spec.deffile.size(); }

std::uint64_t descriptor_pos(const FixtureSpec& spec, std::uint32_t index) {
  return spec.descriptors_offset + std::uint64_t{index} * k_descriptor;
}

unsigned char payload_byte(std::uint64_t off) {
  // A multiplicative hash of the position: neighbouring chunks never match.
  std::uint64_t x = (off + 1) * 0x9e3779b97f4a7c15ULL;
  x ^= x >> 29;
  return static_cast<unsigned char>(x >> 32);
}

std::string make_sif(const FixtureSpec& spec) {
  std::string image = make_prefix(spec);
  const std::uint64_t total = total_of(spec);
  image.reserve(total);
  for (std::uint64_t off = image.size(); off < total; ++off) {
    image += static_cast<char>(payload_byte(off));
  }
  if (spec.corruption == SifCorruption::truncated_header) {
    image.resize(k_truncated_header_size);
  }
  return image;
}

std::string make_sif(std::uint64_t total_size) {
  FixtureSpec spec;
  spec.total_size = total_size;
  return make_sif(spec);
}

void write_bytes(const std::string& path, const std::string& bytes) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) {
    throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  }
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
    }
    done += static_cast<std::size_t>(n);
  }
}

void write_sif(const std::string& path, const FixtureSpec& spec) {
  if (spec.corruption == SifCorruption::truncated_header) {
    write_bytes(path, make_sif(spec));
    return;
  }
  const std::string prefix = make_prefix(spec);
  const std::uint64_t total = total_of(spec);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) {
    throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  }
  auto write_all = [&](const char* p, std::size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd.get(), p, n);
      if (w < 0 && errno == EINTR) {
        continue;
      }
      if (w <= 0) {
        throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  };
  write_all(prefix.data(), prefix.size());
  constexpr std::size_t k_piece = 1 << 20;
  std::string buf;
  for (std::uint64_t off = prefix.size(); off < total;) {
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(k_piece, total - off));
    buf.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      buf[i] = static_cast<char>(payload_byte(off + i));
    }
    write_all(buf.data(), n);
    off += n;
  }
}

void put_le(std::string& image, std::size_t off, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    image[off + i] = static_cast<char>((v >> (8 * i)) & 0xff);
  }
}

}  // namespace lhpc::test
