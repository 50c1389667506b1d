// SIF images for tests: valid ones of an exact total size, and each kind of
// damage read_image must refuse. Built byte by byte from the layout in
// src/sif/sif.h so tests do not need apptainer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lhpc::test {

enum class SifCorruption {
  none,
  wrong_magic,          // magic reads "SIF_MAGIX"
  truncated_header,     // only the first 100 bytes of the image
  bad_version,          // version "02"
  payload_truncated,    // the partition claims one byte more than the file holds (an interrupted copy)
  offset_beyond_eof,    // partition offset 4096 bytes past the end of the file
  size_overflow,        // partition size INT64_MAX: offset + size wraps int64
  table_beyond_eof,     // descriptor table offset one byte past the end of the file
  table_too_small,      // header's table size holds one descriptor fewer than its count
  zero_descriptors,     // header claims no descriptors at all
  no_used_descriptors,  // descriptors present, none in use
};

struct FixtureSpec {
  std::uint64_t total_size = 0;  // exact file size; 0 means min_sif_size(spec)
  std::string arch = "02";       // header and partition arch code: "02" amd64, "04" arm64
  std::uint32_t descriptor_capacity = 4;
  // Right after the header by default; real images put it at 4096.
  std::uint64_t descriptors_offset = 128;
  std::string deffile = "Bootstrap: docker\nFrom: alpine:3.19\n";
  std::string partition_name = "rootfs";
  std::int32_t fs_type = 1;    // squashfs
  std::int32_t part_type = 2;  // primary system
  SifCorruption corruption = SifCorruption::none;
};

// Fixed header values, so tests can compare them.
inline constexpr std::int64_t k_fixture_created = 1700000000;   // 2023-11-14T22:13:20Z
inline constexpr std::int64_t k_fixture_modified = 1700000100;  // 2023-11-14T22:15:00Z
inline constexpr const char* k_fixture_uuid = "00010203-0405-0607-0809-0a0b0c0d0e0f";
// Object ids: the definition file is 1, the partition 2 (both in group 1).
inline constexpr std::uint32_t k_deffile_id = 1;
inline constexpr std::uint32_t k_partition_id = 2;

// Header, descriptor table and definition file with an empty partition.
std::size_t min_sif_size(const FixtureSpec& spec = {});
// Where the partition's data starts; it runs to the end of the file.
std::uint64_t partition_offset(const FixtureSpec& spec = {});
// File offset of descriptor `index` (0 = deffile, 1 = partition) in the table.
std::uint64_t descriptor_pos(const FixtureSpec& spec, std::uint32_t index);

// The image's bytes. Partition content is payload_byte(file offset), so a
// copy that misplaces a chunk differs. Throws std::invalid_argument when
// total_size is below min_sif_size(spec).
std::string make_sif(const FixtureSpec& spec);
// A valid image of exactly total_size bytes (0: the smallest valid one).
std::string make_sif(std::uint64_t total_size);
// Same bytes as make_sif(spec), streamed to `path` in 1 MiB pieces so
// multi-GiB images cost no memory. Throws std::runtime_error on I/O errors.
void write_sif(const std::string& path, const FixtureSpec& spec);
// Writes `bytes` to `path` (for images a test modified).
void write_bytes(const std::string& path, const std::string& bytes);
// The content of the image at file offset `off` inside the partition.
unsigned char payload_byte(std::uint64_t off);
// Stores v little-endian in n bytes at off: for tests that damage one field.
void put_le(std::string& image, std::size_t off, std::uint64_t v, std::size_t n);

}  // namespace lhpc::test
