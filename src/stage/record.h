// What makes a second stage of the same image near instant: a record beside
// each staged copy (its hash and the file's identity when it was verified),
// and rank 0's cache of source hashes so an unchanged multi-GiB source is not
// re-read to learn its hash. Both trust a file's identity (device, inode,
// size, mtime) to stand for its content, the bet make and rsync make; see
// the racy-timestamp rule below for where that bet is refused.
//
// Why cache the source hash: measured on the project's 2-core machine, a
// re-stage of a 1 GiB image onto 4 nodes that all hold it took 0.57-0.78 s
// with the source in page cache and 2.6 s with it cold (hashing is all of
// it), and 1 ms with the cache. On a cluster the source sits on a shared
// file system, where that read is slower still and loads every user's I/O.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <optional>
#include <string>

namespace lhpc::stage {

struct FileStamp {
  std::uint64_t dev = 0;
  std::uint64_t ino = 0;
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;
  std::int64_t ctime_ns = 0;
  bool operator==(const FileStamp&) const = default;
};
FileStamp stamp_of(const struct stat& st);
std::optional<FileStamp> stamp_of(const std::string& path);  // nullopt: cannot stat (missing)

// <image>.stage.json beside a staged copy.
struct StageRecord {
  std::string hash_hex;  // XXH3-128 of the image
  std::uint64_t size = 0;
  FileStamp stamp;     // of the staged file right after it was verified and renamed
  std::string source;  // where it was staged from (for people reading the record)
};
std::string to_json_text(const StageRecord& r);
std::optional<StageRecord> parse_record(const std::string& json_text);  // nullopt: not a record
std::optional<StageRecord> read_record(const std::string& path);        // nullopt: missing or unreadable
void write_record(const std::string& path, const StageRecord& r);       // atomic, 0600; throws Error
// The copy at `staged` still is what the record says: same device, inode,
// size and mtime. ctime is left out on purpose: link() and rename() change
// it without touching the content, and the copy lives in a 0700 directory
// only its owner writes to.
bool record_matches(const StageRecord& r, const FileStamp& staged_now);

// Rank 0's cache of source hashes, one JSON file (at most k_max_entries,
// newest kept). A cache: failures to read or write it are never errors.
class SourceHashCache {
public:
  static constexpr std::size_t k_max_entries = 64;
  // Timestamps this close to the moment the hash was taken cannot tell a
  // later write from the one we read (coarse-timestamp filesystems): such
  // entries are not stored ("racy git" rule).
  static constexpr std::int64_t k_racy_ns = 2'000'000'000;

  explicit SourceHashCache(std::string file) : m_file(std::move(file)) {}
  // The default file: <state dir>/stage-source-hashes.json.
  static std::string default_file();

  // The hash recorded for `path` when its stamp (device, inode, size, mtime
  // and ctime) was exactly `now`.
  std::optional<std::string> lookup(const std::string& path, const FileStamp& now) const;
  // Records the hash of `path` whose content was read starting at `read_started_ns`
  // (CLOCK_REALTIME). Returns false when the entry was refused as racy or could not be written.
  bool remember(const std::string& path, const FileStamp& stamp, const std::string& hash_hex,
                std::int64_t read_started_ns) const;

private:
  std::string m_file;
};

std::int64_t realtime_ns();

}  // namespace lhpc::stage
