// SIF header and descriptor table parsing, validation and rendering. Only the
// first 128 bytes and the descriptor table are read; data objects are
// checked against the file size, never read.
#include "sif/sif.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/fd.h"
#include "util/strings.h"

namespace lhpc::sif {

namespace {

// Global header field offsets (sif.go `header`, encoding/binary: no padding).
constexpr std::size_t k_hdr_launch = 0;
constexpr std::size_t k_hdr_launch_len = 32;
constexpr std::size_t k_hdr_magic = 32;
constexpr std::size_t k_hdr_magic_len = 10;
constexpr std::size_t k_hdr_version = 42;
constexpr std::size_t k_hdr_version_len = 3;
constexpr std::size_t k_hdr_arch = 45;
constexpr std::size_t k_hdr_arch_len = 3;
constexpr std::size_t k_hdr_uuid = 48;
constexpr std::size_t k_hdr_created = 64;
constexpr std::size_t k_hdr_modified = 72;
constexpr std::size_t k_hdr_descr_free = 80;
constexpr std::size_t k_hdr_descr_total = 88;
constexpr std::size_t k_hdr_descr_offset = 96;
constexpr std::size_t k_hdr_descr_size = 104;
constexpr std::size_t k_hdr_data_offset = 112;
constexpr std::size_t k_hdr_data_size = 120;

// Descriptor field offsets (descriptor.go `rawDescriptor`).
constexpr std::size_t k_d_type = 0;
constexpr std::size_t k_d_used = 4;
constexpr std::size_t k_d_id = 5;
constexpr std::size_t k_d_group = 9;
constexpr std::size_t k_d_link = 13;
constexpr std::size_t k_d_offset = 17;
constexpr std::size_t k_d_size = 25;
constexpr std::size_t k_d_size_padded = 33;
constexpr std::size_t k_d_created = 41;
constexpr std::size_t k_d_modified = 49;
constexpr std::size_t k_d_uid = 57;
constexpr std::size_t k_d_gid = 65;
constexpr std::size_t k_d_name = 73;
constexpr std::size_t k_d_name_len = 128;
constexpr std::size_t k_d_extra = 201;
// Partition metadata inside `extra` (descriptor.go `partition`).
constexpr std::size_t k_p_fs = k_d_extra + 0;
constexpr std::size_t k_p_type = k_d_extra + 4;
constexpr std::size_t k_p_arch = k_d_extra + 8;

static_assert(k_hdr_data_size + 8 == k_header_size);
static_assert(k_d_extra + 384 == k_descriptor_size);

// Group and link IDs carry this flag on disk (sif.go descrGroupMask).
constexpr std::uint32_t k_group_mask = 0xf0000000U;

constexpr char k_magic[k_hdr_magic_len] = {'S', 'I', 'F', '_', 'M', 'A', 'G', 'I', 'C', '\0'};
constexpr char k_version[k_hdr_version_len] = {'0', '1', '\0'};

// Descriptors read per pread: bounds memory whatever the header claims.
constexpr std::size_t k_descriptors_per_read = 64;

// Little-endian by explicit shifts: no alignment or aliasing assumptions and
// correct on any host byte order.
std::uint64_t load_le(const unsigned char* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) {
    v = (v << 8) | p[i];
  }
  return v;
}
std::int64_t i64_at(const unsigned char* base, std::size_t off) {
  return static_cast<std::int64_t>(load_le(base + off, 8));
}
std::int32_t i32_at(const unsigned char* base, std::size_t off) {
  return static_cast<std::int32_t>(static_cast<std::uint32_t>(load_le(base + off, 4)));
}
std::uint32_t u32_at(const unsigned char* base, std::size_t off) {
  return static_cast<std::uint32_t>(load_le(base + off, 4));
}

std::string_view bytes_at(const unsigned char* base, std::size_t off, std::size_t len) {
  return {reinterpret_cast<const char*>(base + off), len};
}

std::string_view up_to_nul(std::string_view s) { return s.substr(0, s.find('\0')); }

// Strings from the file end up in terminals and JSON (whose serializer
// throws on invalid UTF-8): keep valid UTF-8, replace control characters
// and stray bytes with '?'.
std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned char lo = 0x80;
    unsigned char hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      lo = c == 0xe0 ? 0xa0 : 0x80;  // no overlongs
      hi = c == 0xed ? 0x9f : 0xbf;  // no surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      lo = c == 0xf0 ? 0x90 : 0x80;
      hi = c == 0xf4 ? 0x8f : 0xbf;
    }
    bool ok = len > 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xbf);
    }
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += '?';
      ++i;
    }
  }
  return out;
}

// For quoting raw bytes (a wrong magic) in a message: printable ASCII as is,
// everything else as \xNN.
std::string escaped(std::string_view s) {
  std::string out;
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += ch;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

std::string num(std::int64_t v) { return std::to_string(v); }
std::string num(std::uint64_t v) { return std::to_string(v); }

const char* const k_hint_recopy =
    "the image is truncated (an interrupted copy?) or corrupt: copy it again and compare its size "
    "with the source, or rebuild it";

[[noreturn]] void fail(const std::string& what, const std::string& hint) { throw Error(Exit::image, what, hint); }

struct OpenImage {
  UniqueFd fd;
  std::uint64_t size = 0;
};

// O_NONBLOCK until the type is known: opening a FIFO must not hang (as
// stage's open_source).
OpenImage open_image(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    std::string hint = "check the path and the file's permissions";
    if (err == ENOENT) {
      hint = "check the path (a relative path is taken from the current directory)";
    } else if (err == EACCES) {
      hint = "make the image readable by you (chmod u+r) or copy it somewhere you can read";
    }
    fail("cannot read SIF image " + path + ": " + errno_text(err), hint);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    fail("cannot stat SIF image " + path + ": " + errno_text(errno), "check the file system holding it");
  }
  if (S_ISDIR(st.st_mode)) {
    fail(path + " is a directory, not a SIF file",
         "a sandbox directory must be built into a SIF first: apptainer build IMAGE.sif " + path);
  }
  if (!S_ISREG(st.st_mode)) {
    fail(path + " is not a regular file" + (S_ISFIFO(st.st_mode) ? " (a FIFO)" : "") + ", so not a SIF image",
         "give the path of a .sif file");
  }
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  return {std::move(fd), static_cast<std::uint64_t>(st.st_size)};
}

// Reads up to n bytes at off; fewer only at end of file.
std::size_t read_at(int fd, unsigned char* buf, std::size_t n, std::uint64_t off, const std::string& path) {
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, buf + got, n - got, static_cast<off_t>(off + got));
    if (r < 0) {
      if (errno == EINTR) {
        continue;
      }
      fail("cannot read SIF image " + path + " at byte " + num(off + got) + ": " + errno_text(errno),
           "check the file system holding it");
    }
    if (r == 0) {
      break;
    }
    got += static_cast<std::size_t>(r);
  }
  return got;
}

// Shared by check_magic and read_image: `head` holds the first `n` bytes of
// a file of `file_size` bytes.
void check_head(const std::string& path, const unsigned char* head, std::size_t n, std::uint64_t file_size) {
  if (file_size == 0) {
    fail(path + " is empty (0 bytes), not a SIF image",
         "the copy or build that made it failed: copy it again or rebuild it");
  }
  if (n < k_magic_end) {
    fail(path + " is truncated or not a SIF image: " + num(file_size) + " bytes, shorter than the " +
             std::to_string(k_header_size) + "-byte SIF header",
         k_hint_recopy);
  }
  const auto magic = bytes_at(head, k_hdr_magic, k_hdr_magic_len);
  if (magic != std::string_view(k_magic, k_hdr_magic_len)) {
    std::string found = std::string(magic);
    found.erase(found.find_last_not_of('\0') + 1);
    std::string hint =
        "give the path of a .sif built by `apptainer build` or `singularity build`; Docker/OCI images and "
        "sandbox directories must be built into a SIF first (apptainer build IMAGE.sif docker://...)";
    if (bytes_at(head, 0, 4) == "hsqs") {
      hint = "this is a bare squashfs file, not a SIF: " + hint;
    }
    fail(path + " is not a SIF file (magic is \"" + escaped(found) + "\", expected SIF_MAGIC)", hint);
  }
}

std::string type_label(const Descriptor& d) { return data_type_name(d.data_type); }

Descriptor parse_descriptor(const unsigned char* p) {
  Descriptor d;
  d.data_type = i32_at(p, k_d_type);
  // Go's encoding/binary decodes any non-zero byte as true.
  d.used = p[k_d_used] != 0;
  d.id = u32_at(p, k_d_id);
  d.group_id = u32_at(p, k_d_group) & ~k_group_mask;
  const std::uint32_t link = u32_at(p, k_d_link);
  d.linked_id = link & ~k_group_mask;
  d.linked_is_group = (link & k_group_mask) == k_group_mask;
  d.offset = i64_at(p, k_d_offset);
  d.size = i64_at(p, k_d_size);
  d.size_with_padding = i64_at(p, k_d_size_padded);
  d.created = i64_at(p, k_d_created);
  d.modified = i64_at(p, k_d_modified);
  d.uid = i64_at(p, k_d_uid);
  d.gid = i64_at(p, k_d_gid);
  d.name = printable(up_to_nul(bytes_at(p, k_d_name, k_d_name_len)));
  if (d.data_type == k_data_partition) {
    d.fs_type = i32_at(p, k_p_fs);
    d.part_type = i32_at(p, k_p_type);
    d.part_arch = arch_name(bytes_at(p, k_p_arch, k_hdr_arch_len));
  }
  return d;
}

// Every used object must lie inside the file: a short copy shows up here
// rather than as a squashfs error inside a container on some node.
void check_object_range(const std::string& path, const Descriptor& d, std::uint64_t file_size) {
  const std::string who = path + ": object id " + std::to_string(d.id) + " (" + type_label(d) + ")";
  if (d.offset < 0 || d.size < 0) {
    fail(who + " has a negative offset or size (offset " + num(d.offset) + ", size " + num(d.size) + ")",
         k_hint_recopy);
  }
  // Both are in [0, 2^63), so their sum fits in 64 unsigned bits.
  const std::uint64_t end = static_cast<std::uint64_t>(d.offset) + static_cast<std::uint64_t>(d.size);
  if (end > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    fail(who + " has offset " + num(d.offset) + " + size " + num(d.size) +
             ", which overflows a 64-bit file offset: the descriptor is corrupt",
         k_hint_recopy);
  }
  if (end > file_size) {
    fail(who + " spans bytes " + num(d.offset) + ".." + num(end) + " but the file is only " + num(file_size) + " bytes",
         k_hint_recopy);
  }
}

}  // namespace

std::string data_type_name(std::int32_t data_type) {
  switch (data_type) {
    case k_data_deffile: return "deffile";
    case k_data_env_var: return "envvar";
    case k_data_labels: return "labels";
    case k_data_partition: return "partition";
    case k_data_signature: return "signature";
    case k_data_generic_json: return "generic-json";
    case k_data_generic: return "generic";
    case k_data_crypto_message: return "crypto-message";
    case k_data_sbom: return "sbom";
    case k_data_oci_root_index: return "oci-root-index";
    case k_data_oci_blob: return "oci-blob";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "unknown(0x%x)", static_cast<unsigned>(data_type));
      return buf;
    }
  }
}

std::string fs_type_name(std::int32_t fs_type) {
  switch (fs_type) {
    case k_fs_squashfs: return "squashfs";
    case k_fs_ext3: return "ext3";
    case k_fs_archive: return "archive";
    case k_fs_raw: return "raw";
    case k_fs_encrypted_squashfs: return "encrypted-squashfs";
    case k_fs_gocryptfs_squashfs: return "gocryptfs-squashfs";
    default: return "unknown(" + std::to_string(fs_type) + ")";
  }
}

std::string part_type_name(std::int32_t part_type) {
  switch (part_type) {
    case k_part_system: return "system";
    case k_part_primary_system: return "primary-system";
    case k_part_data: return "data";
    case k_part_overlay: return "overlay";
    default: return "unknown(" + std::to_string(part_type) + ")";
  }
}

std::string arch_name(std::string_view code) {
  // arch.go: two ASCII digits then NUL; "00" is "unknown" there too.
  static constexpr std::pair<std::string_view, std::string_view> k_arches[] = {
      {"01", "386"},     {"02", "amd64"},   {"03", "arm"},     {"04", "arm64"},  {"05", "ppc64"},
      {"06", "ppc64le"}, {"07", "mips"},    {"08", "mipsle"},  {"09", "mips64"}, {"10", "mips64le"},
      {"11", "s390x"},   {"12", "riscv64"}, {"13", "loong64"},
  };
  code = up_to_nul(code);
  for (const auto& [c, name] : k_arches) {
    if (c == code) {
      return std::string(name);
    }
  }
  return "unknown";
}

std::string uuid_text(const std::array<std::uint8_t, 16>& uuid) {
  std::string out;
  char buf[4];
  for (std::size_t i = 0; i < uuid.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) {
      out += '-';
    }
    std::snprintf(buf, sizeof buf, "%02x", uuid[i]);
    out += buf;
  }
  return out;
}

std::string time_text(std::int64_t unix_seconds) {
  if (unix_seconds == k_unset_time) {
    return "unset";
  }
  const auto t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  char buf[64];
  if (::gmtime_r(&t, &tm) == nullptr || std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) {
    return "@" + std::to_string(unix_seconds);  // out of range for the calendar: show the raw value
  }
  return buf;
}

namespace {

// Where the bytes come from: a file read with pread (the data, possibly GiBs,
// is never read) or a buffer already in memory (tests, fuzzing). Both give
// at most n bytes at off, fewer only at the end.
class Source {
public:
  virtual ~Source() = default;
  virtual std::size_t read(unsigned char* buf, std::size_t n, std::uint64_t off) const = 0;
  virtual std::uint64_t size() const = 0;
};

class FileSource final : public Source {
public:
  FileSource(const std::string& path, OpenImage img) : m_path(path), m_img(std::move(img)) {}
  std::size_t read(unsigned char* buf, std::size_t n, std::uint64_t off) const override {
    return read_at(m_img.fd.get(), buf, n, off, m_path);
  }
  std::uint64_t size() const override { return m_img.size; }

private:
  const std::string& m_path;
  OpenImage m_img;
};

class BufferSource final : public Source {
public:
  explicit BufferSource(std::string_view bytes) : m_bytes(bytes) {}
  std::size_t read(unsigned char* buf, std::size_t n, std::uint64_t off) const override {
    if (off >= m_bytes.size()) {
      return 0;
    }
    const auto got = std::min<std::uint64_t>(n, m_bytes.size() - off);
    std::memcpy(buf, m_bytes.data() + off, static_cast<std::size_t>(got));
    return static_cast<std::size_t>(got);
  }
  std::uint64_t size() const override { return m_bytes.size(); }

private:
  std::string_view m_bytes;
};

void check_magic_from(const Source& src, const std::string& path) {
  unsigned char head[k_magic_end] = {};
  const std::size_t n = src.read(head, sizeof head, 0);
  check_head(path, head, n, src.size());
}

Header parse_header(const unsigned char* raw, const std::string& path) {
  const auto version = bytes_at(raw, k_hdr_version, k_hdr_version_len);
  if (version != std::string_view(k_version, k_hdr_version_len)) {
    fail(path + ": unsupported SIF version \"" + escaped(up_to_nul(version)) + "\" (this build reads version 01)",
         "rebuild the image with a current apptainer or singularity, or upgrade lithops-hpc");
  }
  Header h;
  auto launch = up_to_nul(bytes_at(raw, k_hdr_launch, k_hdr_launch_len));
  if (!launch.empty() && launch.back() == '\n') {
    launch.remove_suffix(1);
  }
  h.launch = printable(launch);
  h.version = std::string(up_to_nul(version));
  h.arch = arch_name(bytes_at(raw, k_hdr_arch, k_hdr_arch_len));
  std::memcpy(h.uuid.data(), raw + k_hdr_uuid, h.uuid.size());
  h.created = i64_at(raw, k_hdr_created);
  h.modified = i64_at(raw, k_hdr_modified);
  h.descriptors_free = i64_at(raw, k_hdr_descr_free);
  h.descriptors_total = i64_at(raw, k_hdr_descr_total);
  h.descriptors_offset = i64_at(raw, k_hdr_descr_offset);
  h.descriptors_size = i64_at(raw, k_hdr_descr_size);
  h.data_offset = i64_at(raw, k_hdr_data_offset);
  h.data_size = i64_at(raw, k_hdr_data_size);
  return h;
}

void check_table(const Header& h, const std::string& path, std::uint64_t file_size) {
  if (h.descriptors_total < 0 || h.descriptors_offset < 0 || h.descriptors_size < 0) {
    fail(path + ": corrupt SIF header: descriptor table offset " + num(h.descriptors_offset) + ", size " +
             num(h.descriptors_size) + ", count " + num(h.descriptors_total) + " (none may be negative)",
         k_hint_recopy);
  }
  // Written as a division so a huge count cannot overflow the product.
  const auto per = static_cast<std::int64_t>(k_descriptor_size);
  if (h.descriptors_total > h.descriptors_size / per) {
    fail(path + ": corrupt SIF header: the descriptor table is " + num(h.descriptors_size) +
             " bytes, too small for its " + num(h.descriptors_total) + " descriptors of " + num(per) + " bytes",
         k_hint_recopy);
  }
  const std::uint64_t table_end =
      static_cast<std::uint64_t>(h.descriptors_offset) + static_cast<std::uint64_t>(h.descriptors_size);
  if (table_end > file_size) {
    fail(path + ": descriptor table at bytes " + num(h.descriptors_offset) + ".." + num(table_end) +
             " lies outside the file (" + num(file_size) + " bytes)",
         k_hint_recopy);
  }
}

void read_descriptors(const Source& src, const std::string& path, Image& out) {
  const Header& h = out.header;
  const auto total = static_cast<std::uint64_t>(h.descriptors_total);
  std::vector<unsigned char> buf(k_descriptors_per_read * k_descriptor_size);
  for (std::uint64_t first = 0; first < total; first += k_descriptors_per_read) {
    const auto count = static_cast<std::size_t>(std::min<std::uint64_t>(k_descriptors_per_read, total - first));
    const std::size_t want = count * k_descriptor_size;
    const std::uint64_t at = static_cast<std::uint64_t>(h.descriptors_offset) + first * k_descriptor_size;
    if (src.read(buf.data(), want, at) != want) {
      // The size check passed, so the file shrank while we read it.
      fail(path + " is truncated: it ended inside the descriptor table (it changed while being read?)", k_hint_recopy);
    }
    for (std::size_t i = 0; i < count; ++i) {
      const unsigned char* p = buf.data() + i * k_descriptor_size;
      if (p[k_d_used] == 0) {
        continue;
      }
      Descriptor d = parse_descriptor(p);
      check_object_range(path, d, src.size());
      out.descriptors.push_back(std::move(d));
    }
  }
}

Image parse_from(const Source& src, const std::string& path) {
  Image out;
  out.path = path;
  out.file_size = src.size();

  unsigned char raw[k_header_size] = {};
  const std::size_t n = src.read(raw, sizeof raw, 0);
  check_head(path, raw, n, src.size());
  if (n < k_header_size) {
    fail(path + " is truncated: " + num(src.size()) + " bytes, shorter than the " + std::to_string(k_header_size) +
             "-byte SIF header",
         k_hint_recopy);
  }
  out.header = parse_header(raw, path);
  check_table(out.header, path, src.size());
  read_descriptors(src, path, out);
  if (out.descriptors.empty()) {
    fail(path + " holds no data objects (0 of " + num(out.header.descriptors_total) + " descriptors used)",
         "the image is empty, so there is nothing to run: rebuild it with `apptainer build`");
  }
  return out;
}

}  // namespace

void check_magic(const std::string& path) { check_magic_from(FileSource(path, open_image(path)), path); }

void check_magic_bytes(std::string_view bytes, const std::string& name) { check_magic_from(BufferSource(bytes), name); }

Image read_image(const std::string& path) { return parse_from(FileSource(path, open_image(path)), path); }

Image parse_image(std::string_view bytes, const std::string& name) { return parse_from(BufferSource(bytes), name); }

const Descriptor* primary_partition(const Image& image) {
  for (const auto& d : image.descriptors) {
    if (d.data_type == k_data_partition && d.part_type == k_part_primary_system) {
      return &d;
    }
  }
  return nullptr;
}

namespace {

// Columns follow `apptainer sif list` (id, group, link, position, type)
// with the partition metadata split out so it can be read at a glance.
std::string descriptor_table(const Image& image) {
  std::string out;
  using Row = std::array<std::string, 10>;
  std::vector<Row> rows;
  rows.push_back({"ID", "TYPE", "GROUP", "LINK", "NAME", "FS", "PARTITION", "ARCH", "OFFSET", "SIZE"});
  for (const auto& d : image.descriptors) {
    const bool part = d.data_type == k_data_partition;
    std::string link = "-";
    if (d.linked_id != 0) {
      link = std::to_string(d.linked_id) + (d.linked_is_group ? " (G)" : "");
    }
    rows.push_back({
        std::to_string(d.id),
        data_type_name(d.data_type),
        d.group_id != 0 ? std::to_string(d.group_id) : "-",
        link,
        d.name.empty() ? "-" : d.name,
        part ? fs_type_name(d.fs_type) : "-",
        part ? part_type_name(d.part_type) : "-",
        part ? d.part_arch : "-",
        num(d.offset),
        human_bytes(static_cast<double>(d.size)),
    });
  }
  std::array<std::size_t, 10> width{};
  for (const auto& r : rows) {
    for (std::size_t c = 0; c < r.size(); ++c) {
      width[c] = std::max(width[c], r[c].size());
    }
  }
  for (const auto& r : rows) {
    std::string text;
    for (std::size_t c = 0; c < r.size(); ++c) {
      text += r[c];
      if (c + 1 < r.size()) {
        text.append(width[c] - r[c].size() + 2, ' ');
      }
    }
    out += text;
    out += '\n';
  }
  return out;
}

}  // namespace

std::string format_text(const Image& image) {
  const Header& h = image.header;
  std::string out;
  auto line = [&out](std::string_view key, const std::string& value) {
    out += key;
    out.append(key.size() < 15 ? 15 - key.size() : 1, ' ');
    out += value;
    out += '\n';
  };
  line("Image:", printable(image.path));
  line("File size:", human_bytes(static_cast<double>(image.file_size)) + " (" + num(image.file_size) + " bytes)");
  line("Architecture:", h.arch);
  line("SIF version:", h.version);
  line("UUID:", uuid_text(h.uuid));
  line("Created:", time_text(h.created));
  line("Modified:", time_text(h.modified));
  line("Descriptors:", std::to_string(image.descriptors.size()) + " used of " + num(h.descriptors_total) +
                           " (table at byte " + num(h.descriptors_offset) + ", data at byte " + num(h.data_offset) +
                           ")");
  out += '\n';

  out += descriptor_table(image);
  return out;
}

nlohmann::json to_json(const Image& image) {
  const Header& h = image.header;
  auto time_or_null = [](std::int64_t t) -> nlohmann::json {
    if (t == k_unset_time) {
      return nullptr;
    }
    return time_text(t);
  };
  auto id_or_null = [](std::uint32_t id) -> nlohmann::json {
    if (id == 0) {
      return nullptr;
    }
    return id;
  };
  nlohmann::json descriptors = nlohmann::json::array();
  for (const auto& d : image.descriptors) {
    const bool part = d.data_type == k_data_partition;
    descriptors.push_back({
        {"id", d.id},
        {"type", data_type_name(d.data_type)},
        {"group", id_or_null(d.group_id)},
        {"link", id_or_null(d.linked_id)},
        {"link_is_group", d.linked_is_group},
        {"offset", d.offset},
        {"size", d.size},
        {"name", d.name.empty() ? nlohmann::json(nullptr) : nlohmann::json(d.name)},
        {"fs", part ? nlohmann::json(fs_type_name(d.fs_type)) : nlohmann::json(nullptr)},
        {"partition_type", part ? nlohmann::json(part_type_name(d.part_type)) : nlohmann::json(nullptr)},
        {"arch", part ? nlohmann::json(d.part_arch) : nlohmann::json(nullptr)},
    });
  }
  return {
      {"path", printable(image.path)},
      {"size", image.file_size},
      {"arch", h.arch},
      {"version", h.version},
      {"uuid", uuid_text(h.uuid)},
      {"created", time_or_null(h.created)},
      {"modified", time_or_null(h.modified)},
      {"descriptors_total", h.descriptors_total},
      {"descriptors_free", h.descriptors_free},
      {"descriptors", std::move(descriptors)},
  };
}

}  // namespace lhpc::sif
