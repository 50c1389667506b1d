// SIF (Singularity Image Format) reader: parses and validates the global
// header and the descriptor table of a .sif file without reading its data,
// and renders them for `lithops-hpc sif inspect` (text and JSON). Layout and
// names follow github.com/apptainer/sif/v2 pkg/sif (sif.go, descriptor.go,
// arch.go), which is the format's reference implementation.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

// The full header, not json_fwd.hpp: callers of to_json() dump() the result.
#include <nlohmann/json.hpp>

namespace lhpc::sif {

// On-disk sizes (little-endian, no padding between fields).
inline constexpr std::size_t k_header_size = 128;
inline constexpr std::size_t k_descriptor_size = 585;
// Launch script (32) + magic (10): enough to tell a SIF from anything else.
inline constexpr std::size_t k_magic_end = 42;

// Data object types (sif.go DataType, iota + 0x4001).
inline constexpr std::int32_t k_data_deffile = 0x4001;
inline constexpr std::int32_t k_data_env_var = 0x4002;
inline constexpr std::int32_t k_data_labels = 0x4003;
inline constexpr std::int32_t k_data_partition = 0x4004;
inline constexpr std::int32_t k_data_signature = 0x4005;
inline constexpr std::int32_t k_data_generic_json = 0x4006;
inline constexpr std::int32_t k_data_generic = 0x4007;
inline constexpr std::int32_t k_data_crypto_message = 0x4008;
inline constexpr std::int32_t k_data_sbom = 0x4009;
inline constexpr std::int32_t k_data_oci_root_index = 0x400a;
inline constexpr std::int32_t k_data_oci_blob = 0x400b;

// File system types of partitions (sif.go FSType, iota + 1).
inline constexpr std::int32_t k_fs_squashfs = 1;
inline constexpr std::int32_t k_fs_ext3 = 2;
inline constexpr std::int32_t k_fs_archive = 3;
inline constexpr std::int32_t k_fs_raw = 4;
inline constexpr std::int32_t k_fs_encrypted_squashfs = 5;
inline constexpr std::int32_t k_fs_gocryptfs_squashfs = 6;

// Partition types (sif.go PartType, iota + 1). The primary system partition
// is the root file system an engine runs.
inline constexpr std::int32_t k_part_system = 1;
inline constexpr std::int32_t k_part_primary_system = 2;
inline constexpr std::int32_t k_part_data = 3;
inline constexpr std::int32_t k_part_overlay = 4;

struct Descriptor {
  std::int32_t data_type = 0;
  bool used = false;
  std::uint32_t id = 0;
  // Group and link with the on-disk group flag (0xf0000000) removed, as the
  // Go API reports them; 0 means none.
  std::uint32_t group_id = 0;
  std::uint32_t linked_id = 0;
  bool linked_is_group = false;  // linked_id names an object group, not an object
  std::int64_t offset = 0;
  std::int64_t size = 0;
  std::int64_t size_with_padding = 0;
  std::int64_t created = 0;
  std::int64_t modified = 0;
  std::int64_t uid = 0;  // deprecated in the format; always 0 from current tools
  std::int64_t gid = 0;
  std::string name;  // up to the first NUL; control characters and bad UTF-8 shown as '?'
  // Partitions only (0 / empty otherwise).
  std::int32_t fs_type = 0;
  std::int32_t part_type = 0;
  std::string part_arch;  // Go arch name ("amd64"), see arch_name()
};

struct Header {
  std::string launch;   // "#!/usr/bin/env run-singularity", without its newline
  std::string version;  // "01"
  std::string arch;     // Go arch name of the primary partition ("amd64"), "unknown" if unset
  std::array<std::uint8_t, 16> uuid{};
  std::int64_t created = 0;  // Unix seconds; k_unset_time when not recorded
  std::int64_t modified = 0;
  std::int64_t descriptors_free = 0;
  std::int64_t descriptors_total = 0;
  std::int64_t descriptors_offset = 0;
  std::int64_t descriptors_size = 0;
  std::int64_t data_offset = 0;
  std::int64_t data_size = 0;
};

struct Image {
  std::string path;
  std::uint64_t file_size = 0;
  Header header;
  std::vector<Descriptor> descriptors;  // used ones, in table order
};

// Deterministic images (`OptCreateDeterministic`) store Go's zero time.Time,
// whose Unix() is this, instead of a real timestamp.
inline constexpr std::int64_t k_unset_time = -62135596800;

// Human names, stable for JSON and scripts; "unknown" (with the number for
// data types) when the value is not in the reference tables.
std::string data_type_name(std::int32_t data_type);               // "deffile", "partition", "oci-blob", ...
std::string fs_type_name(std::int32_t fs_type);                   // "squashfs", "ext3", ...
std::string part_type_name(std::int32_t part_type);               // "system", "primary-system", ...
std::string arch_name(std::string_view code);                     // "02" -> "amd64", "04" -> "arm64"
std::string uuid_text(const std::array<std::uint8_t, 16>& uuid);  // 8-4-4-4-12 lowercase hex
std::string time_text(std::int64_t unix_seconds);                 // "2024-05-01T12:00:00Z", "unset"

// Reads and validates the header and descriptor table of `path` with a few
// preads (the data, possibly GiBs, is never read). Throws Error(Exit::image)
// naming the path for: unreadable, empty or truncated header, bad magic,
// unsupported version, a descriptor table outside the file, no used
// descriptor, and any used object that does not lie inside the file.
Image read_image(const std::string& path);

// The cheap check before staging: reads the first 42 bytes only. Throws
// Error(Exit::image) for unreadable (with errno), empty, truncated, not a SIF.
void check_magic(const std::string& path);

// The same two checks on bytes already in memory, `name` standing for the
// path in messages: what tests and the fuzzers (tests/fuzz/) call, so the
// parser is exercised without a file system in the way.
Image parse_image(std::string_view bytes, const std::string& name);
void check_magic_bytes(std::string_view bytes, const std::string& name);

// The partition an engine runs (primary system), or nullptr.
const Descriptor* primary_partition(const Image& image);

// `sif inspect PATH`: header summary then one row per data object.
std::string format_text(const Image& image);

// `sif inspect --json`. Keys (stable): path, size (bytes), arch, version,
// uuid, created, modified (ISO 8601 UTC or null), descriptors_total,
// descriptors_free, descriptors: [{id, type, group, link, link_is_group,
// offset, size, name, fs, partition_type, arch}]. group/link are null when
// none; name/fs/partition_type/arch are null when absent or not a partition.
nlohmann::json to_json(const Image& image);

}  // namespace lhpc::sif
