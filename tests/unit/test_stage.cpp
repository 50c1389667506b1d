// Staging without MPI: hashes, where copies go, which rank leads a node, how
// an image is cut into chunks, and the records that let a second stage skip.
// The collective parts run under real Open MPI in tests/integration/test_stage.py.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "stage/hash.h"
#include "stage/layout.h"
#include "stage/progress.h"
#include "stage/record.h"
#include "stage/sbcast.h"
#include "test_support.h"
#include "tests/unit/sif_fixtures.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/process.h"

using lhpc::test::TempDir;
using namespace lhpc;
using namespace lhpc::stage;

namespace {

std::string hex_of(const std::string& data) {
  Hasher h;
  h.update(data.data(), data.size());
  return h.hex();
}

}  // namespace

TEST_CASE("xxh3-128 matches the reference implementation's known values") {
  // XXH3_128bits of no input, as `xxh128sum /dev/null` prints it.
  CHECK(hex_of("") == "99aa06d3014798d86001c324468d497f");
  CHECK(to_hex(XXH3_128bits("", 0)) == "99aa06d3014798d86001c324468d497f");
  CHECK(hex_of("abc") == to_hex(XXH3_128bits("abc", 3)));
  CHECK(hex_of("abc").size() == 32);
}

TEST_CASE("hashing in pieces gives the hash of the whole, wherever the pieces are cut") {
  auto img = lhpc::test::make_sif(3 * 1024 * 1024 + 17);
  auto whole = to_hex(XXH3_128bits(img.data(), img.size()));
  for (std::size_t piece : {1u, 4096u, 1u << 20, 3u << 20}) {
    Hasher h;
    for (std::size_t off = 0; off < img.size(); off += piece) {
      h.update(img.data() + off, std::min(piece, img.size() - off));
    }
    CHECK(h.hex() == whole);
  }
}

TEST_CASE("a file's hash is the hash of its bytes, and one changed byte changes it") {
  TempDir t;
  auto img = lhpc::test::make_sif(200000);
  lhpc::test::write_bytes(t.file("a.sif"), img);
  auto h = to_hex(hash_file(t.file("a.sif"), 4096));
  CHECK(h == to_hex(XXH3_128bits(img.data(), img.size())));
  img[150000] ^= 1;
  lhpc::test::write_bytes(t.file("b.sif"), img);
  CHECK(to_hex(hash_file(t.file("b.sif"))) != h);
  CHECK_THROWS_AS(hash_file(t.file("missing.sif")), Error);
}

TEST_CASE("hashing stops when the callback between reads throws (a signal)") {
  TempDir t;
  lhpc::test::write_bytes(t.file("a.sif"), lhpc::test::make_sif(100000));
  int calls = 0;
  CHECK_THROWS_AS(hash_file(t.file("a.sif"), 4096,
                            [&] {
                              if (++calls == 3) {
                                throw Error(Exit::terminated, "stop");
                              }
                            }),
                  Error);
  CHECK(calls == 3);
}

TEST_CASE("the private directory is per user and job, under sif_path") {
  CHECK(private_dir("/tmp", 1000, "4242") == "/tmp/lithops-hpc-1000-4242");
  CHECK(private_dir("/tmp/", 1000, "4242") == "/tmp/lithops-hpc-1000-4242");
  CHECK(private_dir("/", 0, "local") == "/lithops-hpc-0-local");
  CHECK(private_dir_prefix(1000) == "lithops-hpc-1000-");
  auto staged = staged_path("/tmp/lithops-hpc-1000-4242", "/shared/images/rt.sif");
  CHECK(staged == "/tmp/lithops-hpc-1000-4242/rt.sif");
  CHECK(record_path(staged) == "/tmp/lithops-hpc-1000-4242/rt.sif.stage.json");
}

TEST_CASE("partial files are hidden, name their process, and are recognised for cleanup") {
  std::string staged = "/tmp/d/rt.sif";
  CHECK(partial_path(staged, 4711) == "/tmp/d/.rt.sif.part-4711");
  CHECK(sbcast_partial_path(staged) == "/tmp/d/.rt.sif.part-sbcast");
  CHECK(is_partial_of(staged, ".rt.sif.part-4711"));
  CHECK(is_partial_of(staged, ".rt.sif.part-sbcast"));
  CHECK_FALSE(is_partial_of(staged, "rt.sif"));
  CHECK_FALSE(is_partial_of(staged, ".other.sif.part-1"));
  CHECK_FALSE(is_partial_of(staged, ".rt.sif.part-"));
  CHECK(partial_pid(staged, ".rt.sif.part-4711") == 4711);
  CHECK(partial_pid(staged, ".rt.sif.part-sbcast") == -1);
  CHECK(partial_pid(staged, ".rt.sif.part-12x") == -1);
}

TEST_CASE("each node is led by its lowest rank, nodes numbered by first appearance") {
  auto m = map_nodes({"n2", "n1", "n2", "n3", "n1"});
  CHECK(m.nodes() == 3);
  CHECK(m.names == std::vector<std::string>{"n2", "n1", "n3"});
  CHECK(m.leader_of_node == std::vector<int>{0, 1, 3});
  CHECK(m.node_of_rank == std::vector<int>{0, 1, 0, 2, 1});
  CHECK(m.is_leader(0));
  CHECK(m.is_leader(1));
  CHECK_FALSE(m.is_leader(2));
  CHECK(m.is_leader(3));
  CHECK_FALSE(m.is_leader(4));
  CHECK_FALSE(m.is_leader(5));

  auto every_rank_a_node = map_nodes({"node0", "node1", "node2", "node3"});
  CHECK(every_rank_a_node.nodes() == 4);
  for (int r = 0; r < 4; ++r) {
    CHECK(every_rank_a_node.is_leader(r));
  }
  CHECK(map_nodes({"x", "x", "x"}).nodes() == 1);
}

TEST_CASE("chunks: an exact multiple, one byte over, smaller than one chunk") {
  const std::uint64_t c = 8u << 20;
  CHECK(chunk_count(4 * c, c) == 4);
  CHECK(chunk_length(4 * c, c, 3) == c);
  CHECK(chunk_count(4 * c + 1, c) == 5);
  CHECK(chunk_length(4 * c + 1, c, 4) == 1);
  CHECK(chunk_count(1, c) == 1);
  CHECK(chunk_length(1, c, 0) == 1);
  CHECK(chunk_count(0, c) == 0);
  CHECK(chunk_length(c, c, 1) == 0);
  std::uint64_t sum = 0;
  for (std::uint64_t i = 0; i < chunk_count(123456789, c); ++i) {
    sum += chunk_length(123456789, c, i);
  }
  CHECK(sum == 123456789);
}

TEST_CASE("a stage record survives a round trip and garbage is not a record") {
  StageRecord r{.hash_hex = "99aa06d3014798d86001c324468d497f",
                .size = 1234,
                .stamp = {.dev = 1, .ino = 2, .size = 1234, .mtime_ns = 5, .ctime_ns = 6},
                .source = "/shared/rt.sif"};
  auto back = parse_record(to_json_text(r));
  REQUIRE(back);
  CHECK(back->hash_hex == r.hash_hex);
  CHECK(back->size == 1234);
  CHECK(back->stamp == r.stamp);
  CHECK(back->source == "/shared/rt.sif");
  CHECK_FALSE(parse_record("not json"));
  CHECK_FALSE(parse_record("{}"));
  auto bad_hash = r;
  bad_hash.hash_hex = "XYZ";
  CHECK_FALSE(parse_record(to_json_text(bad_hash)));
}

TEST_CASE("a record whose numbers are not integers of the right sign is not a record") {
  StageRecord r{.hash_hex = std::string(32, 'a'), .size = 5, .stamp = {1, 2, 5, 3, 4}, .source = "/x.sif"};
  auto text = to_json_text(r);
  REQUIRE(parse_record(text));
  auto with = [&](const std::string& from, const std::string& to) {
    auto t = text;
    auto at = t.find(from);
    REQUIRE(at != std::string::npos);
    return t.replace(at, from.size(), to);
  };
  CHECK_FALSE(parse_record(with("\"size\": 5", "\"size\": 1e20")));
  CHECK_FALSE(parse_record(with("\"size\": 5", "\"size\": -5")));
  CHECK_FALSE(parse_record(with("\"size\": 5", "\"size\": 5.5")));
  CHECK_FALSE(parse_record(with("\"ino\": 2", "\"ino\": 1e300")));
  CHECK_FALSE(parse_record(with("\"mtime_ns\": 3", "\"mtime_ns\": 1e20")));
  CHECK_FALSE(parse_record(with("\"mtime_ns\": 3", "\"mtime_ns\": 18446744073709551615")));
  CHECK_FALSE(parse_record("[1, 2]"));
}

TEST_CASE("sbcast does not get the broker URL") {
  Env ours = Env::empty();
  ours.set("AMQP_URL", "amqp://u:secret@broker/");
  ours.set("SLURM_JOB_ID", "7");
  auto env = sbcast_env(ours);
  CHECK_FALSE(env.get("AMQP_URL"));
  CHECK(env.get("SLURM_JOB_ID") == "7");
}

TEST_CASE("a record vouches for a staged copy only while the file is untouched") {
  TempDir t;
  auto img = t.file("rt.sif");
  lhpc::test::write_sif(img, {.total_size = 100000});
  auto st = stamp_of(img);
  REQUIRE(st);
  StageRecord r{.hash_hex = to_hex(hash_file(img)), .size = st->size, .stamp = *st, .source = "x"};
  write_record(record_path(img), r);
  struct stat s {};
  REQUIRE(::stat(record_path(img).c_str(), &s) == 0);
  CHECK((s.st_mode & 0777) == 0600);
  auto rec = read_record(record_path(img));
  REQUIRE(rec);
  CHECK(record_matches(*rec, *stamp_of(img)));

  // A hard link (another job's copy) changes ctime, not the content: still valid.
  REQUIRE(::link(img.c_str(), t.file("linked.sif").c_str()) == 0);
  CHECK(record_matches(*rec, *stamp_of(img)));

  // Rewritten in place (even with the same size): the mtime moves.
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  {
    std::fstream f(img, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(50000);
    f.put('x');
  }
  CHECK_FALSE(record_matches(*rec, *stamp_of(img)));

  // Replaced by another file: a new inode.
  lhpc::test::write_sif(t.file("other.sif"), {.total_size = 100000});
  std::filesystem::rename(t.file("other.sif"), img);
  CHECK_FALSE(record_matches(*rec, *stamp_of(img)));
  CHECK_FALSE(read_record(t.file("none.stage.json")));
}

TEST_CASE("the source hash cache answers only for the same file, unchanged") {
  TempDir t;
  SourceHashCache cache(t.file("state/hashes.json"));
  auto src = t.file("rt.sif");
  lhpc::test::write_sif(src, {.total_size = 50000});
  auto st = *stamp_of(src);
  const std::string h = "0123456789abcdef0123456789abcdef";
  const auto later = st.mtime_ns + 10 * SourceHashCache::k_racy_ns;

  CHECK_FALSE(cache.lookup(src, st));
  CHECK(cache.remember(src, st, h, later));
  CHECK(cache.lookup(src, st) == h);

  auto moved = st;
  moved.mtime_ns += 1;
  CHECK_FALSE(cache.lookup(src, moved));
  auto chmodded = st;
  chmodded.ctime_ns += 1;
  CHECK_FALSE(cache.lookup(src, chmodded));
  auto other_inode = st;
  other_inode.ino += 1;
  CHECK_FALSE(cache.lookup(src, other_inode));
  CHECK_FALSE(cache.lookup(t.file("elsewhere.sif"), st));

  struct stat s {};
  REQUIRE(::stat(t.file("state/hashes.json").c_str(), &s) == 0);
  CHECK((s.st_mode & 0777) == 0600);
}

TEST_CASE("a source hashed right after it was written is not cached (racy timestamps)") {
  TempDir t;
  SourceHashCache cache(t.file("hashes.json"));
  FileStamp st{.dev = 1, .ino = 2, .size = 3, .mtime_ns = 1'000'000'000'000, .ctime_ns = 1'000'000'000'000};
  const std::string h = "0123456789abcdef0123456789abcdef";
  CHECK_FALSE(cache.remember("/x.sif", st, h, st.mtime_ns + 1'000'000));
  CHECK_FALSE(cache.lookup("/x.sif", st));
  CHECK(cache.remember("/x.sif", st, h, st.mtime_ns + SourceHashCache::k_racy_ns + 1));
  CHECK(cache.lookup("/x.sif", st) == h);
}

TEST_CASE("the source hash cache keeps the newest entries and shrugs off a damaged file") {
  TempDir t;
  SourceHashCache cache(t.file("hashes.json"));
  const std::int64_t when = 10 * SourceHashCache::k_racy_ns;
  for (std::size_t i = 0; i < SourceHashCache::k_max_entries + 5; ++i) {
    FileStamp st{.ino = i};
    CHECK(cache.remember("/img" + std::to_string(i), st, "0123456789abcdef0123456789abcdef", when));
  }
  CHECK_FALSE(cache.lookup("/img0", FileStamp{.ino = 0}));
  CHECK(cache.lookup("/img" + std::to_string(SourceHashCache::k_max_entries + 4),
                     FileStamp{.ino = SourceHashCache::k_max_entries + 4}));
  lhpc::write_file_atomic(t.file("hashes.json"), "{ not json", 0600);
  CHECK_FALSE(cache.lookup("/img1", FileStamp{.ino = 1}));
  CHECK(cache.remember("/img1", FileStamp{.ino = 1}, "0123456789abcdef0123456789abcdef", when));
  CHECK(cache.lookup("/img1", FileStamp{.ino = 1}));
}

TEST_CASE("progress reads as bytes, MB/s and ETA") {
  CHECK(rate_text(1e9, 1.0) == "1000 MB/s");
  CHECK(rate_text(5e7, 1.0) == "50.0 MB/s");
  CHECK(rate_text(1e9, 0) == "0 MB/s");
  CHECK(eta_text(7) == "0:07");
  CHECK(eta_text(750) == "12:30");
  CHECK(eta_text(3723) == "1:02:03");
  CHECK(eta_text(-1) == "?");
  CHECK(progress_text(512u << 20, 1u << 30, 1.0) == "512.0 MiB / 1.0 GiB (50%), 537 MB/s, ETA 0:01");
  CHECK(progress_text(0, 1u << 30, 0) == "0 B / 1.0 GiB (0%), 0 MB/s, ETA ?");
}
