// SIF parsing: what `sif inspect` shows and which damaged images are refused
// (and how the refusal reads) before anything is staged.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>

#include "sif/sif.h"
#include "test_support.h"
#include "tests/unit/sif_fixtures.h"
#include "util/error.h"

using lhpc::test::TempDir;
using namespace lhpc;
using lhpc::test::FixtureSpec;
using lhpc::test::SifCorruption;

namespace {

std::string write_fixture(const TempDir& dir, const std::string& name, const FixtureSpec& spec) {
  const auto path = dir.file(name);
  test::write_sif(path, spec);
  return path;
}

// Runs f, requires an image error, returns its message (and checks a hint is given).
template <typename F>
std::string image_error(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    CHECK(e.code() == Exit::image);
    CHECK_FALSE(e.hint().empty());
    return e.what();
  }
  FAIL("no lhpc::Error thrown");
  return {};
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

FixtureSpec corrupt(SifCorruption c, std::uint64_t total = 8192) {
  FixtureSpec spec;
  spec.total_size = total;
  spec.corruption = c;
  return spec;
}

}  // namespace

TEST_CASE("read_image parses the header and the used descriptors") {
  TempDir dir{"sif"};
  FixtureSpec spec;
  spec.total_size = 10000;
  const auto path = write_fixture(dir, "ok.sif", spec);

  const auto img = sif::read_image(path);
  CHECK(img.path == path);
  CHECK(img.file_size == 10000);
  CHECK(img.header.launch == "#!/usr/bin/env run-singularity");
  CHECK(img.header.version == "01");
  CHECK(img.header.arch == "amd64");
  CHECK(sif::uuid_text(img.header.uuid) == test::k_fixture_uuid);
  CHECK(img.header.created == test::k_fixture_created);
  CHECK(img.header.modified == test::k_fixture_modified);
  CHECK(img.header.descriptors_total == 4);
  CHECK(img.header.descriptors_free == 2);
  CHECK(img.header.descriptors_offset == 128);
  CHECK(img.header.descriptors_size == 4 * 585);
  CHECK(img.header.data_offset == 128 + 4 * 585);
  CHECK(img.header.data_size == 10000 - (128 + 4 * 585));

  REQUIRE(img.descriptors.size() == 2);
  const auto& def = img.descriptors[0];
  CHECK(def.used);
  CHECK(def.data_type == sif::k_data_deffile);
  CHECK(def.id == test::k_deffile_id);
  CHECK(def.group_id == 1);  // on disk 0xf0000001: the group flag is stripped
  CHECK(def.linked_id == 0);
  CHECK(def.offset == img.header.data_offset);
  CHECK(def.size == static_cast<std::int64_t>(spec.deffile.size()));
  CHECK(def.created == test::k_fixture_created);
  CHECK(def.name.empty());
  CHECK(def.fs_type == 0);

  const auto& part = img.descriptors[1];
  CHECK(part.data_type == sif::k_data_partition);
  CHECK(part.id == test::k_partition_id);
  CHECK(part.name == "rootfs");
  CHECK(part.fs_type == sif::k_fs_squashfs);
  CHECK(part.part_type == sif::k_part_primary_system);
  CHECK(part.part_arch == "amd64");
  CHECK(part.offset == static_cast<std::int64_t>(test::partition_offset(spec)));
  CHECK(part.offset + part.size == 10000);
  CHECK(sif::primary_partition(img) == &part);
}

TEST_CASE("the descriptor table is found where the header says, not at a fixed offset") {
  TempDir dir{"sif"};
  FixtureSpec spec;
  spec.descriptors_offset = 4096;  // where apptainer puts it
  spec.descriptor_capacity = 48;
  spec.arch = "04";
  spec.total_size = 64 * 1024;
  const auto img = sif::read_image(write_fixture(dir, "at4096.sif", spec));
  CHECK(img.header.descriptors_offset == 4096);
  CHECK(img.header.descriptors_total == 48);
  CHECK(img.header.arch == "arm64");
  REQUIRE(img.descriptors.size() == 2);
  CHECK(img.descriptors[1].part_arch == "arm64");
  CHECK(img.descriptors[1].offset + img.descriptors[1].size == 64 * 1024);
}

TEST_CASE("make_sif builds valid images of exactly the requested size") {
  TempDir dir{"sif"};
  const std::uint64_t chunk = 4096;
  for (std::uint64_t size :
       {std::uint64_t{test::min_sif_size()}, std::uint64_t{test::min_sif_size()} + 1, 3 * chunk, 3 * chunk + 1}) {
    CAPTURE(size);
    const auto bytes = test::make_sif(size);
    CHECK(bytes.size() == size);
    const auto path = dir.file("s.sif");
    test::write_bytes(path, bytes);
    const auto img = sif::read_image(path);
    CHECK(img.file_size == size);
    REQUIRE(sif::primary_partition(img) != nullptr);
    const auto* part = sif::primary_partition(img);
    CHECK(static_cast<std::uint64_t>(part->offset + part->size) == size);
    for (std::uint64_t off = static_cast<std::uint64_t>(part->offset); off < size; off += 997) {
      CHECK(static_cast<unsigned char>(bytes[off]) == test::payload_byte(off));
    }
  }
  CHECK_THROWS_AS(test::make_sif(test::min_sif_size() - 1), std::invalid_argument);
  CHECK(test::make_sif(0).size() == test::min_sif_size());

  // The streaming writer produces the same bytes as the in-memory builder.
  FixtureSpec spec;
  spec.total_size = (1 << 20) * 2 + 123;
  const auto path = write_fixture(dir, "big.sif", spec);
  std::ifstream in(path, std::ios::binary);
  const std::string on_disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(on_disk == test::make_sif(spec));
}

TEST_CASE("a file shorter than the SIF header is refused as truncated") {
  TempDir dir{"sif"};
  const auto path = write_fixture(dir, "short.sif", corrupt(SifCorruption::truncated_header));
  const auto msg = image_error([&] { sif::read_image(path); });
  CHECK(msg == path + " is truncated: 100 bytes, shorter than the 128-byte SIF header");
  // A few bytes: cannot even tell whether it was meant to be a SIF.
  test::write_bytes(path, "#!/usr");
  CHECK(contains(image_error([&] { sif::read_image(path); }), path + " is truncated or not a SIF image: 6 bytes"));
}

TEST_CASE("a file without SIF_MAGIC is refused, quoting the magic found") {
  TempDir dir{"sif"};
  const auto path = write_fixture(dir, "magic.sif", corrupt(SifCorruption::wrong_magic));
  CHECK(image_error([&] { sif::read_image(path); }) ==
        path + " is not a SIF file (magic is \"SIF_MAGIX\", expected SIF_MAGIC)");

  // A bare squashfs (someone passed the rootfs instead of the image) gets a pointed hint.
  std::string squash(4096, '\0');
  squash.replace(0, 4, "hsqs");
  squash[32] = '\x01';
  test::write_bytes(path, squash);
  try {
    sif::read_image(path);
    FAIL("accepted a squashfs file");
  } catch (const Error& e) {
    CHECK(std::string(e.what()) == path + " is not a SIF file (magic is \"\\x01\", expected SIF_MAGIC)");
    CHECK(contains(e.hint(), "bare squashfs"));
  }
}

TEST_CASE("an unsupported SIF version is refused") {
  TempDir dir{"sif"};
  const auto path = write_fixture(dir, "v2.sif", corrupt(SifCorruption::bad_version));
  CHECK(image_error([&] { sif::read_image(path); }) ==
        path + ": unsupported SIF version \"02\" (this build reads version 01)");
}

TEST_CASE("a partition that runs past the end of the file is refused, naming its id and range") {
  TempDir dir{"sif"};
  auto spec = corrupt(SifCorruption::payload_truncated);
  const auto path = write_fixture(dir, "cut.sif", spec);
  const auto start = test::partition_offset(spec);
  CHECK(image_error([&] { sif::read_image(path); }) == path + ": object id 2 (partition) spans bytes " +
                                                           std::to_string(start) + "..8193 but the file is only " +
                                                           "8192 bytes");

  spec = corrupt(SifCorruption::offset_beyond_eof);
  write_fixture(dir, "cut.sif", spec);
  const auto size = 8192 - start;
  CHECK(image_error([&] { sif::read_image(path); }) == path + ": object id 2 (partition) spans bytes 12288.." +
                                                           std::to_string(12288 + size) +
                                                           " but the file is only 8192 bytes");
}

TEST_CASE("offset + size that overflows int64 is caught, not wrapped") {
  TempDir dir{"sif"};
  const auto spec = corrupt(SifCorruption::size_overflow);
  const auto path = write_fixture(dir, "wrap.sif", spec);
  CHECK(image_error([&] { sif::read_image(path); }) ==
        path + ": object id 2 (partition) has offset " + std::to_string(test::partition_offset(spec)) +
            " + size 9223372036854775807, which overflows a 64-bit file offset: the descriptor is corrupt");

  // A negative size (the other way a signed field goes wrong).
  auto bytes = test::make_sif(spec.total_size);
  test::put_le(bytes, test::descriptor_pos(spec, 1) + 25, static_cast<std::uint64_t>(-5), 8);
  test::write_bytes(path, bytes);
  CHECK(contains(image_error([&] { sif::read_image(path); }), "object id 2 (partition) has a negative offset or size"));
}

TEST_CASE("a descriptor table outside the file or too small for its count is refused") {
  TempDir dir{"sif"};
  const auto path = write_fixture(dir, "table.sif", corrupt(SifCorruption::table_beyond_eof));
  CHECK(image_error([&] { sif::read_image(path); }) == path + ": descriptor table at bytes 8193.." +
                                                           std::to_string(8193 + 4 * 585) +
                                                           " lies outside the file (8192 bytes)");

  write_fixture(dir, "table.sif", corrupt(SifCorruption::table_too_small));
  CHECK(image_error([&] { sif::read_image(path); }) ==
        path +
            ": corrupt SIF header: the descriptor table is 1755 bytes, too small for its 4 descriptors of 585 bytes");

  // A count so large that count * 585 would overflow int64.
  auto bytes = test::make_sif(8192);
  test::put_le(bytes, 88, static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), 8);
  test::write_bytes(path, bytes);
  CHECK(contains(image_error([&] { sif::read_image(path); }), "too small for its 9223372036854775807 descriptors"));
}

TEST_CASE("an image with no data objects is refused") {
  TempDir dir{"sif"};
  const auto path = write_fixture(dir, "none.sif", corrupt(SifCorruption::zero_descriptors));
  CHECK(image_error([&] { sif::read_image(path); }) == path + " holds no data objects (0 of 0 descriptors used)");
  write_fixture(dir, "none.sif", corrupt(SifCorruption::no_used_descriptors));
  CHECK(image_error([&] { sif::read_image(path); }) == path + " holds no data objects (0 of 4 descriptors used)");
}

TEST_CASE("check_magic accepts a SIF and refuses empty, foreign and unreadable files") {
  TempDir dir{"sif"};
  const auto good = write_fixture(dir, "good.sif", FixtureSpec{});
  CHECK_NOTHROW(sif::check_magic(good));
  // Only 42 bytes are looked at: a damaged table is read_image's business.
  CHECK_NOTHROW(sif::check_magic(write_fixture(dir, "table.sif", corrupt(SifCorruption::table_beyond_eof))));

  const auto empty = dir.file("empty.sif");
  test::write_bytes(empty, "");
  CHECK(image_error([&] { sif::check_magic(empty); }) == empty + " is empty (0 bytes), not a SIF image");

  const auto text = dir.file("notes.txt");
  test::write_bytes(text, "Bootstrap: docker\nFrom: python:3.11-slim\n%post\n  pip install lithops\n");
  CHECK(contains(image_error([&] { sif::check_magic(text); }), text + " is not a SIF file (magic is \""));

  const auto missing = dir.file("missing.sif");
  CHECK(image_error([&] { sif::check_magic(missing); }) ==
        "cannot read SIF image " + missing + ": No such file or directory");
  const auto below_file = good + "/x.sif";
  CHECK(image_error([&] { sif::check_magic(below_file); }) ==
        "cannot read SIF image " + below_file + ": Not a directory");
  CHECK(image_error([&] { sif::check_magic(dir.path); }) == dir.path + " is a directory, not a SIF file");

  if (::geteuid() != 0) {  // root reads mode-000 files anyway
    const auto locked = write_fixture(dir, "locked.sif", FixtureSpec{});
    ::chmod(locked.c_str(), 0);
    CHECK(image_error([&] { sif::check_magic(locked); }) == "cannot read SIF image " + locked + ": Permission denied");
  }
}

TEST_CASE("parse_image and check_magic_bytes judge bytes in memory as read_image and check_magic judge the file") {
  TempDir dir{"sif"};
  const std::pair<const char*, FixtureSpec> cases[] = {
      {"good", FixtureSpec{}},
      {"wrong-magic", corrupt(SifCorruption::wrong_magic)},
      {"truncated-header", corrupt(SifCorruption::truncated_header)},
      {"bad-version", corrupt(SifCorruption::bad_version)},
      {"payload-truncated", corrupt(SifCorruption::payload_truncated)},
      {"size-overflow", corrupt(SifCorruption::size_overflow)},
      {"table-beyond-eof", corrupt(SifCorruption::table_beyond_eof)},
      {"table-too-small", corrupt(SifCorruption::table_too_small)},
      {"no-used-descriptors", corrupt(SifCorruption::no_used_descriptors)},
  };
  for (const auto& [name, spec] : cases) {
    CAPTURE(name);
    const auto path = write_fixture(dir, std::string(name) + ".sif", spec);
    const std::string bytes = test::make_sif(spec);
    auto outcome = [](auto&& f) -> std::string {
      try {
        return sif::to_json(f()).dump();
      } catch (const Error& e) {
        return std::string("error: ") + e.what() + " / " + e.hint();
      }
    };
    CHECK(outcome([&] { return sif::parse_image(bytes, path); }) == outcome([&] { return sif::read_image(path); }));
    auto magic = [](auto&& f) -> std::string {
      try {
        f();
        return "ok";
      } catch (const Error& e) {
        return e.what();
      }
    };
    CHECK(magic([&] { sif::check_magic_bytes(bytes, path); }) == magic([&] { sif::check_magic(path); }));
  }
  CHECK(image_error([] { sif::parse_image("", "mem.sif"); }) == "mem.sif is empty (0 bytes), not a SIF image");
  CHECK(image_error([] { sif::check_magic_bytes(std::string(41, 'x'), "mem.sif"); }) ==
        "mem.sif is truncated or not a SIF image: 41 bytes, shorter than the 128-byte SIF header");
}

TEST_CASE("to_json has the documented keys") {
  TempDir dir{"sif"};
  FixtureSpec spec;
  spec.total_size = 20000;
  auto bytes = test::make_sif(spec);
  // Link the definition file to group 1 the way a group signature is linked.
  test::put_le(bytes, test::descriptor_pos(spec, 0) + 13, 0xf0000001U, 4);
  const auto path = dir.file("j.sif");
  test::write_bytes(path, bytes);

  const auto j = sif::to_json(sif::read_image(path));
  std::set<std::string> keys;
  for (const auto& [k, v] : j.items()) {
    keys.insert(k);
  }
  CHECK(keys == std::set<std::string>{"path", "size", "arch", "version", "uuid", "created", "modified",
                                      "descriptors_total", "descriptors_free", "descriptors"});
  CHECK(j["path"] == path);
  CHECK(j["size"] == 20000);
  CHECK(j["arch"] == "amd64");
  CHECK(j["version"] == "01");
  CHECK(j["uuid"] == test::k_fixture_uuid);
  CHECK(j["created"] == "2023-11-14T22:13:20Z");
  CHECK(j["modified"] == "2023-11-14T22:15:00Z");

  REQUIRE(j["descriptors"].size() == 2);
  for (const auto& d : j["descriptors"]) {
    std::set<std::string> dk;
    for (const auto& [k, v] : d.items()) {
      dk.insert(k);
    }
    CHECK(dk == std::set<std::string>{"id", "type", "group", "link", "link_is_group", "offset", "size", "name", "fs",
                                      "partition_type", "arch"});
  }
  const auto& def = j["descriptors"][0];
  CHECK(def["type"] == "deffile");
  CHECK(def["group"] == 1);
  CHECK(def["link"] == 1);
  CHECK(def["link_is_group"] == true);
  CHECK(def["name"].is_null());
  CHECK(def["fs"].is_null());
  const auto& part = j["descriptors"][1];
  CHECK(part["id"] == 2);
  CHECK(part["type"] == "partition");
  CHECK(part["link"].is_null());
  CHECK(part["name"] == "rootfs");
  CHECK(part["fs"] == "squashfs");
  CHECK(part["partition_type"] == "primary-system");
  CHECK(part["arch"] == "amd64");
  CHECK(part["offset"].get<std::int64_t>() + part["size"].get<std::int64_t>() == 20000);
}

TEST_CASE("format_text shows the header and a row per object") {
  TempDir dir{"sif"};
  FixtureSpec spec;
  spec.total_size = 3 * 1024 * 1024;
  const auto path = write_fixture(dir, "t.sif", spec);
  const auto text = sif::format_text(sif::read_image(path));
  CHECK(contains(text, "Image:         " + path + "\n"));
  CHECK(contains(text, "File size:     3.0 MiB (3145728 bytes)\n"));
  CHECK(contains(text, "Architecture:  amd64\n"));
  CHECK(contains(text, "SIF version:   01\n"));
  CHECK(contains(text, std::string("UUID:          ") + test::k_fixture_uuid + "\n"));
  CHECK(contains(text, "Created:       2023-11-14T22:13:20Z\n"));
  CHECK(contains(text, "ID  TYPE       GROUP  LINK  NAME    FS        PARTITION       ARCH   OFFSET  SIZE\n"));
  const auto offset = std::to_string(test::partition_offset(spec));
  CHECK(contains(text,
                 "2   partition  1      -     rootfs  squashfs  primary-system  amd64  " + offset + "    3.0 MiB\n"));
  CHECK(contains(text, "1   deffile    1      -     -       -         -               -      2468    36 B\n"));
}

TEST_CASE("names with control characters or bad UTF-8 are made printable") {
  TempDir dir{"sif"};
  FixtureSpec spec;
  spec.partition_name = "\x1b[31mred\xff \xc3\xa9t\xc3\xa9";
  const auto img = sif::read_image(write_fixture(dir, "n.sif", spec));
  CHECK(img.descriptors[1].name == "?[31mred? \xc3\xa9t\xc3\xa9");
  CHECK_NOTHROW((void)sif::to_json(img).dump());
}

TEST_CASE("type, file system, partition and architecture names follow apptainer/sif") {
  CHECK(sif::data_type_name(0x4001) == "deffile");
  CHECK(sif::data_type_name(0x4002) == "envvar");
  CHECK(sif::data_type_name(0x4004) == "partition");
  CHECK(sif::data_type_name(0x4005) == "signature");
  CHECK(sif::data_type_name(0x4009) == "sbom");
  CHECK(sif::data_type_name(0x400b) == "oci-blob");
  CHECK(sif::data_type_name(0x4099) == "unknown(0x4099)");
  CHECK(sif::fs_type_name(1) == "squashfs");
  CHECK(sif::fs_type_name(6) == "gocryptfs-squashfs");
  CHECK(sif::part_type_name(2) == "primary-system");
  CHECK(sif::part_type_name(9) == "unknown(9)");
  CHECK(sif::arch_name(std::string_view("02\0", 3)) == "amd64");
  CHECK(sif::arch_name("04") == "arm64");
  CHECK(sif::arch_name("13") == "loong64");
  CHECK(sif::arch_name("00") == "unknown");
  CHECK(sif::arch_name("zz") == "unknown");
  CHECK(sif::time_text(0) == "1970-01-01T00:00:00Z");
  CHECK(sif::time_text(sif::k_unset_time) == "unset");
}
