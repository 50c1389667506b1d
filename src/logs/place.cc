#include "logs/place.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <nlohmann/json.hpp>
#include <utility>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_number.h"

namespace lhpc::logs {

namespace {

std::string jobs_dir() { return state_dir() + "/jobs"; }

UniqueFd open_chain(int fd, std::string shown, const std::vector<std::string>& chain, bool create) {
  UniqueFd cur;
  for (const auto& c : chain) {
    shown += "/" + c;
    int at = cur ? cur.get() : fd;
    if (!create) {
      struct stat st {};
      if (::fstatat(at, c.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
        return UniqueFd();
      }
    }
    cur = open_private_dir_at(at, c, shown, create);
  }
  return cur;
}

}  // namespace

Place place_for(const std::string& setting, const std::string& job) {
  check_path_component("the job id", job);
  Place p;
  if (setting == "node") {
    p = {"node", "/tmp", false, {"lithops-hpc-" + std::to_string(::geteuid()), job}, ""};
  } else if (setting == "state") {
    p = {"state", state_dir(), true, {"jobs", job, "logs"}, ""};
  } else {
    p = {"path", setting, false, {job}, ""};
  }
  p.dir = p.root;
  for (const auto& c : p.chain) {
    p.dir += "/" + c;
  }
  return p;
}

std::string file_name(int rank) { return "rank-" + std::to_string(rank) + ".log"; }

UniqueFd open_dir(const Place& place, bool create) {
  if (!create && !path_exists(place.root)) {
    return UniqueFd();
  }
  // A root lithops-hpc makes is private; one the user already has (PATH,
  // /tmp) keeps its mode: it only has to be trusted, and what is below it
  // (the job's directory) is private.
  bool made_here = create && !path_exists(place.root);
  UniqueFd root = place.root_private || made_here ? open_private_dir(place.root, create) : open_trusted_dir(place.root);
  return open_chain(root.get(), place.root, place.chain, create);
}

void write_record(const Record& r) {
  nlohmann::ordered_json doc = {
      {"version", 1},    {"job", r.job}, {"where", r.where}, {"dir", r.dir}, {"max_bytes", r.max_bytes},
      {"nodes", r.nodes}};
  auto state = open_private_dir(state_dir(), true);
  auto job = open_chain(state.get(), state_dir(), {"jobs", r.job}, true);
  write_file_atomic_at(job.get(), "logs.json", doc.dump() + "\n", 0600, jobs_dir() + "/" + r.job + "/logs.json");
}

Place record_place(const std::string& setting, const std::string& job, std::uint64_t max_bytes,
                   std::vector<std::string> nodes) {
  auto place = place_for(setting, job);
  write_record({.job = job, .where = place.where, .dir = place.dir, .max_bytes = max_bytes, .nodes = std::move(nodes)});
  return place;
}

std::optional<Record> read_record(const std::string& job) {
  check_path_component("the job id", job);
  std::string path = jobs_dir() + "/" + job + "/logs.json";
  auto text = read_private_file(path, 1 << 20);
  if (!text) {
    return std::nullopt;
  }
  auto j = nlohmann::json::parse(*text, nullptr, false);
  try {
    if (j.is_discarded()) {
      throw std::runtime_error("not JSON");
    }
    Record r;
    r.job = j.at("job").get<std::string>();
    r.where = j.at("where").get<std::string>();
    r.dir = j.at("dir").get<std::string>();
    auto max_bytes = json_integer<std::uint64_t>(j.at("max_bytes"));
    if (!max_bytes) {
      throw std::runtime_error("max_bytes " + json_integer_rule<std::uint64_t>());
    }
    r.max_bytes = *max_bytes;
    r.nodes = j.at("nodes").get<std::vector<std::string>>();
    return r;
  } catch (const std::exception& e) {
    throw Error(Exit::failure, path + " is not a lithops-hpc log record: " + e.what(),
                "remove it; the deployment writes it again when it starts");
  }
}

std::optional<std::string> newest_record_job() {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(jobs_dir().c_str()), ::closedir);
  if (!d) {
    return std::nullopt;
  }
  std::optional<std::string> best;
  struct timespec best_t {};
  while (auto* e = ::readdir(d.get())) {
    std::string name = e->d_name;
    struct stat st {};
    if (name == "." || name == ".." || ::stat((jobs_dir() + "/" + name + "/logs.json").c_str(), &st) != 0) {
      continue;
    }
    if (!best || st.st_mtim.tv_sec > best_t.tv_sec ||
        (st.st_mtim.tv_sec == best_t.tv_sec && st.st_mtim.tv_nsec > best_t.tv_nsec)) {
      best = name;
      best_t = st.st_mtim;
    }
  }
  return best;
}

}  // namespace lhpc::logs
