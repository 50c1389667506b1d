#include "stage/record.h"

#include <time.h>

#include <cstdint>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_number.h"

namespace lhpc::stage {

using nlohmann::json;

FileStamp stamp_of(const struct stat& st) {
  FileStamp s;
  s.dev = static_cast<std::uint64_t>(st.st_dev);
  s.ino = static_cast<std::uint64_t>(st.st_ino);
  s.size = static_cast<std::uint64_t>(st.st_size);
  s.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  s.ctime_ns = static_cast<std::int64_t>(st.st_ctim.tv_sec) * 1'000'000'000 + st.st_ctim.tv_nsec;
  return s;
}

std::optional<FileStamp> stamp_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return std::nullopt;
  }
  return stamp_of(st);
}

namespace {
json stamp_json(const FileStamp& s) {
  return {{"dev", s.dev}, {"ino", s.ino}, {"size", s.size}, {"mtime_ns", s.mtime_ns}, {"ctime_ns", s.ctime_ns}};
}
// Numbers by util/json_number's one rule (get<> of 1e20 would be undefined).
template <class T>
T integer_at(const json& j, const char* key) {
  const auto& v = j.at(key);
  auto n = json_integer<T>(v);
  if (!n) {
    throw json::type_error::create(302, std::string(key) + " " + json_integer_rule<T>(), &v);
  }
  return *n;
}
std::uint64_t unsigned_at(const json& j, const char* key) { return integer_at<std::uint64_t>(j, key); }
std::int64_t signed_at(const json& j, const char* key) { return integer_at<std::int64_t>(j, key); }
FileStamp stamp_from(const json& j) {
  FileStamp s;
  s.dev = unsigned_at(j, "dev");
  s.ino = unsigned_at(j, "ino");
  s.size = unsigned_at(j, "size");
  s.mtime_ns = signed_at(j, "mtime_ns");
  s.ctime_ns = signed_at(j, "ctime_ns");
  return s;
}
bool is_hex128(const std::string& s) {
  return s.size() == 32 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}
}  // namespace

std::string to_json_text(const StageRecord& r) {
  json j = {{"format", "lithops-hpc stage record 1"},
            {"xxh3_128", r.hash_hex},
            {"size", r.size},
            {"file", stamp_json(r.stamp)},
            {"source", r.source}};
  return j.dump(2) + "\n";
}

std::optional<StageRecord> parse_record(const std::string& text) {
  try {
    auto j = json::parse(text);
    if (!j.is_object() || j.value("format", "") != "lithops-hpc stage record 1") {
      return std::nullopt;
    }
    StageRecord r;
    r.hash_hex = j.at("xxh3_128").get<std::string>();
    r.size = unsigned_at(j, "size");
    r.stamp = stamp_from(j.at("file"));
    r.source = j.value("source", "");
    if (!is_hex128(r.hash_hex)) {
      return std::nullopt;
    }
    return r;
  } catch (const json::exception&) {
    return std::nullopt;
  }
}

std::optional<StageRecord> read_record(const std::string& path) {
  if (!path_exists(path)) {
    return std::nullopt;
  }
  try {
    return parse_record(read_file(path));
  } catch (const Error&) {
    return std::nullopt;
  }
}

void write_record(const std::string& path, const StageRecord& r) { write_file_atomic(path, to_json_text(r), 0600); }

bool record_matches(const StageRecord& r, const FileStamp& now) {
  return r.size == now.size && r.stamp.dev == now.dev && r.stamp.ino == now.ino && r.stamp.size == now.size &&
         r.stamp.mtime_ns == now.mtime_ns;
}

std::int64_t realtime_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

std::string SourceHashCache::default_file() { return state_dir() + "/stage-source-hashes.json"; }

namespace {
// The cache decides which hash rank 0 believes: read only from a state
// directory that is ours and private, never through a symlink.
json load_entries(const std::string& file) {
  try {
    auto text = read_private_file(file, std::size_t{4} << 20);
    if (!text) {
      return json::array();
    }
    auto j = json::parse(*text);
    if (j.is_object() && j.value("format", "") == "lithops-hpc source hashes 1" && j.contains("entries") &&
        j["entries"].is_array()) {
      return j["entries"];
    }
  } catch (const std::exception&) {
  }
  return json::array();
}
}  // namespace

std::optional<std::string> SourceHashCache::lookup(const std::string& path, const FileStamp& now) const {
  for (const auto& e : load_entries(m_file)) {
    try {
      if (e.at("path").get<std::string>() == path && stamp_from(e.at("file")) == now) {
        auto h = e.at("xxh3_128").get<std::string>();
        if (is_hex128(h)) {
          return h;
        }
      }
    } catch (const json::exception&) {
    }
  }
  return std::nullopt;
}

bool SourceHashCache::remember(const std::string& path, const FileStamp& stamp, const std::string& hash_hex,
                               std::int64_t read_started_ns) const {
  if (stamp.mtime_ns > read_started_ns - k_racy_ns || stamp.ctime_ns > read_started_ns - k_racy_ns) {
    return false;
  }
  json kept = json::array();
  kept.push_back(
      {{"path", path}, {"file", stamp_json(stamp)}, {"xxh3_128", hash_hex}, {"hashed_at_ns", read_started_ns}});
  for (const auto& e : load_entries(m_file)) {
    if (kept.size() >= k_max_entries) {
      break;
    }
    if (e.is_object() && e.value("path", "") != path) {
      kept.push_back(e);
    }
  }
  try {
    make_private_dir(dirname_of(m_file));
    write_file_atomic(m_file, json{{"format", "lithops-hpc source hashes 1"}, {"entries", kept}}.dump(1) + "\n", 0600);
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace lhpc::stage
