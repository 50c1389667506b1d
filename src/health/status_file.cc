#include "health/status_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "config/config.h"
#include "health/report.h"
#include "health/view.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/json_number.h"
#include "util/strings.h"

namespace lhpc::health {

namespace {

// A status file has one entry per rank: far below this for any cluster.
constexpr std::size_t k_max_status_bytes = 64 << 20;

// Only this user's regular files, reached by util/fs's trust rules: a status
// file someone else planted in a shared state dir must not steer `stop` or
// `status`, and a FIFO must not hang them. nullopt when there is none.
std::optional<std::string> read_status_file(const std::string& path) {
  return read_trusted_file(path, k_max_status_bytes, FileOwner::me);
}

}  // namespace

void check_job_id(const std::string& job) {
  bool ok = !job.empty() && job != "." && job != ".." && job.size() <= 128;
  for (char c : job) {
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                 c == '-' || c == '+';
    ok = ok && plain;
  }
  if (!ok) {
    throw Error(Exit::usage, "'" + bounded_for_log(job, 128) + "' is not a job id",
                "a job id is a Slurm job id (e.g. 12345 or 12345_7) or a name of letters, digits, '.', '_', '-', '+'");
  }
}

Location locate(const std::string& job, const std::string& configured) {
  check_job_id(job);
  Location loc;
  loc.job = job;
  loc.dir = state_dir() + "/jobs/" + job;
  loc.link = loc.dir + "/status.json";
  loc.status = configured.empty() ? loc.link : configured;
  loc.stop = loc.dir + "/stop";
  return loc;
}

void prepare(const Location& loc) {
  auto root = state_dir();
  if (!path_exists(root)) {
    make_private_dir(root);
  }
  make_private_dir(root + "/jobs");
  make_private_dir(loc.dir);
  clear_stop(loc);
  if (loc.status != loc.link) {
    // The configured file's directory passes the trust rules (missing ones
    // made under checked ones), as write_status checks each time.
    make_trusted_dir(dirname_of(std::filesystem::absolute(loc.status).string()));
    std::error_code ec;
    std::filesystem::remove(loc.link, ec);
    std::filesystem::create_symlink(std::filesystem::absolute(loc.status), loc.link, ec);
    if (ec) {
      throw Error(Exit::failure, "cannot link " + loc.link + " to " + loc.status + ": " + ec.message(),
                  "`lithops-hpc status` finds deployments through that link; check " + loc.dir);
    }
  }
}

// Through the directory opened by the trust rules, never by its path: a
// link another user owns on the way is refused, not followed.
void write_status(const Location& loc, const std::string& json) {
  auto path = std::filesystem::absolute(loc.status).string();
  auto dir = open_trusted_dir(dirname_of(path));
  write_file_atomic_at(dir.get(), basename_of(path), json, 0600, loc.status);
}

bool stop_requested(const Location& loc) {
  struct stat st {};
  return ::stat(loc.stop.c_str(), &st) == 0;
}

void request_stop(const Location& loc) {
  auto text = fmt::format("requested_by={}@{} pid={} time={:.3f}\n", user_name(), config::short_hostname(), ::getpid(),
                          unix_now());
  write_file_atomic(loc.stop, text, 0600);
}

void clear_stop(const Location& loc) {
  if (::unlink(loc.stop.c_str()) != 0 && errno != ENOENT) {
    throw Error(Exit::failure, "cannot remove the old stop request " + loc.stop + ": " + errno_text(errno));
  }
}

std::optional<std::string> job_from_environment() {
  for (const char* name : {"SLURM_JOB_ID", "LITHOPS_HPC_JOB_ID"}) {
    if (const char* v = std::getenv(name); v && *v) {
      return std::string(v);
    }
  }
  return std::nullopt;
}

std::vector<Location> job_locations() {
  std::vector<Location> out;
  std::error_code ec;
  for (const auto& d : std::filesystem::directory_iterator(state_dir() + "/jobs", ec)) {
    try {
      out.push_back(locate(d.path().filename().string()));
    } catch (const Error&) {
      continue;  // not one of ours
    }
  }
  return out;
}

Lookup find_deployment(const std::string& job) {
  Lookup out;
  std::string want = job;
  std::string why;
  if (want.empty()) {
    if (auto env = job_from_environment()) {
      want = *env;
      why = std::getenv("SLURM_JOB_ID") ? " ($SLURM_JOB_ID)" : " ($LITHOPS_HPC_JOB_ID)";
    }
  }
  if (!want.empty()) {
    auto loc = locate(want);
    out.looked = loc.link + why;
    if (auto text = read_status_file(loc.link)) {
      out.found = Found{loc, *text};
    }
    return out;
  }
  auto jobs = state_dir() + "/jobs";
  out.looked = jobs + "/*/status.json";
  double newest = -1;
  for (const auto& loc : job_locations()) {
    std::optional<std::string> text;
    try {
      text = read_status_file(loc.link);
    } catch (const Error&) {
      continue;  // not ours to show: `status JOB` says why
    }
    if (!text) {
      continue;
    }
    auto doc = nlohmann::json::parse(*text, nullptr, false);
    auto updated = doc.is_object() && doc.contains("updated") ? json_real(doc["updated"]) : std::nullopt;
    if (updated && *updated > newest) {
      newest = *updated;
      out.found = Found{loc, *text};
    }
  }
  return out;
}

namespace {
// An ended (or stale) deployment whose last update is older than the limit.
bool prunable(const std::string& link, double now, double keep_seconds) {
  try {
    auto text = read_status_file(link);
    if (!text) {
      return false;
    }
    auto view = parse_status(*text, link);
    bool over = ended(view.state) || assess(view, now).stale;
    return over && now - view.updated > keep_seconds;
  } catch (const Error&) {
    return false;  // not one we can read: `status JOB` says why; never removed blind
  }
}
}  // namespace

int prune_ended(double now, double keep_seconds, const std::string& keep_job) {
  int removed = 0;
  for (const auto& loc : job_locations()) {
    struct stat st {};
    bool a_directory = ::lstat(loc.dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    if (loc.job == keep_job || !a_directory || !prunable(loc.link, now, keep_seconds)) {
      continue;
    }
    std::error_code rm;
    std::filesystem::remove_all(loc.dir, rm);  // links inside are removed, never followed
    if (rm) {
      spdlog::warn("cannot remove the ended deployment {}: {}", loc.dir, rm.message());
      continue;
    }
    spdlog::info("removed the state of deployment {}, ended over {:g} s ago (health.keep_ended)", loc.job,
                 keep_seconds);
    ++removed;
  }
  return removed;
}

}  // namespace lhpc::health
