#include "slurm/job.h"

#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <mutex>

#include <spdlog/spdlog.h>

#include "lhpc_build_config.h"
#include "util/strings.h"

#if LHPC_HAVE_SLURM
#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <slurm/slurm.h>
#include <slurm/slurm_errno.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <map>

#include "util/fd.h"
#endif

namespace lhpc::slurm {

namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    return std::nullopt;
  }
  return std::string(v);
}

constexpr std::size_t k_max_hosts = 1u << 20;

bool all_digits(std::string_view s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string_view::npos;
}

std::optional<std::uint64_t> to_u64(std::string_view s) {
  if (!all_digits(s) || s.size() > 18) {
    return std::nullopt;
  }
  std::uint64_t v = 0;
  std::from_chars(s.data(), s.data() + s.size(), v);
  return v;
}

std::string padded(std::uint64_t n, std::size_t width) {
  std::string s = std::to_string(n);
  if (s.size() < width) {
    s.insert(0, width - s.size(), '0');
  }
  return s;
}

// "1-3,5,08-10" -> the names' numeric parts; width from the low bound as Slurm does.
std::optional<std::vector<std::string>> expand_ranges(std::string_view body) {
  std::vector<std::string> out;
  for (const auto& part : split(body, ',')) {
    auto dash = part.find('-');
    std::string_view lo_s = std::string_view(part).substr(0, dash);
    std::string_view hi_s = dash == std::string::npos ? lo_s : std::string_view(part).substr(dash + 1);
    auto lo = to_u64(lo_s);
    auto hi = to_u64(hi_s);
    if (!lo || !hi || *hi < *lo || *hi - *lo >= k_max_hosts || out.size() + (*hi - *lo) >= k_max_hosts) {
      return std::nullopt;
    }
    for (auto n = *lo; n <= *hi; ++n) {
      out.push_back(padded(n, lo_s.size()));
    }
  }
  return out;
}

// One item: literal text and bracket groups; each group multiplies the names so far.
bool expand_item(std::string_view item, std::vector<std::string>& out) {
  std::vector<std::string> names{""};
  std::size_t i = 0;
  while (i < item.size()) {
    if (item[i] == '[') {
      auto close = item.find(']', i);
      if (close == std::string_view::npos) {
        return false;
      }
      auto nums = expand_ranges(item.substr(i + 1, close - i - 1));
      if (!nums || names.size() * nums->size() >= k_max_hosts) {
        return false;
      }
      std::vector<std::string> next;
      next.reserve(names.size() * nums->size());
      for (const auto& n : names) {
        for (const auto& x : *nums) {
          next.push_back(n + x);
        }
      }
      names = std::move(next);
      i = close + 1;
    } else if (item[i] == ']') {
      return false;
    } else {
      auto next = item.find_first_of("[]", i);
      auto text = item.substr(i, next == std::string_view::npos ? std::string_view::npos : next - i);
      for (auto& n : names) {
        n += text;
      }
      i += text.size();
    }
  }
  if (out.size() + names.size() > k_max_hosts) {
    return false;
  }
  out.insert(out.end(), names.begin(), names.end());
  return true;
}

[[maybe_unused]] const char* state_name(std::uint32_t base) {
  static const char* const k_names[] = {"PENDING", "RUNNING",   "SUSPENDED", "COMPLETED", "CANCELLED", "FAILED",
                                        "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",  "OUT_OF_MEMORY"};
  return base < std::size(k_names) ? k_names[base] : "UNKNOWN";
}

JobInfo info_from_environment(const std::string& id) {
  JobInfo j;
  j.job_id = id;
  j.from_environment = true;
  j.state = "RUNNING";  // we are inside it
  j.name = env("SLURM_JOB_NAME").value_or("");
  j.partition = env("SLURM_JOB_PARTITION").value_or("");
  j.user = env("SLURM_JOB_USER").value_or("");
  j.node_list = node_list();
  j.nodes = compress_hostlist(j.node_list);
  auto count = env("SLURM_JOB_NUM_NODES");
  if (!count) {
    count = env("SLURM_NNODES");
  }
  if (auto n = count ? to_u64(*count) : std::nullopt) {
    j.num_nodes = static_cast<std::uint32_t>(*n);
  } else {
    j.num_nodes = static_cast<std::uint32_t>(j.node_list.size());
  }
  // Slurm 23.02 and later export these; older releases leave them unset.
  if (auto s = env("SLURM_JOB_START_TIME"); s && to_u64(*s)) {
    j.start_time = static_cast<std::int64_t>(*to_u64(*s));
  }
  if (auto e = env("SLURM_JOB_END_TIME"); e && to_u64(*e)) {
    j.end_time = static_cast<std::int64_t>(*to_u64(*e));
  }
  return j;
}

[[maybe_unused]] std::optional<std::uint32_t> numeric_job_id(const std::string& id) {
  auto v = to_u64(id);
  if (!v || *v == 0 || *v > 0xfffffff0u) {
    spdlog::debug("slurm: '{}' is not a numeric job id", id);
    return std::nullopt;
  }
  return static_cast<std::uint32_t>(*v);
}

#if LHPC_HAVE_SLURM

// libslurm is not thread-safe in all its paths; every call goes through this.
std::mutex g_mutex;
enum class InitState { untried, ok, unavailable };
InitState g_init = InitState::untried;

// slurm_init() calls fatal() -- exit(1) -- when it finds no usable
// configuration (no file and no DNS SRV record, a parse error), and retries a
// missing $SLURM_CONF for 60 s first. So the first initialisation is tried in
// a forked child; the parent initialises only after the child survived it.
bool probe_init_in_child() {
  if (auto conf = env("SLURM_CONF")) {
    struct stat st {};
    if (::stat(conf->c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      spdlog::debug("slurm: SLURM_CONF={} is not a file; libslurm not used", *conf);
      return false;
    }
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    spdlog::debug("slurm: pipe failed; libslurm not used");
    return false;
  }
  UniqueFd rd(fds[0]), wr(fds[1]);
  pid_t pid = ::fork();
  if (pid < 0) {
    spdlog::debug("slurm: fork failed; libslurm not used");
    return false;
  }
  if (pid == 0) {
    int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 1);
    ::dup2(wr.get(), 2);
    slurm_init(nullptr);
    ::_exit(0);  // exit-codes: the forked probe's own status, read by its parent
  }
  wr.reset();
  std::string errors;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool timed_out = false;
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{rd.get(), POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      timed_out = n == 0;
      break;
    }
    char buf[512];
    auto got = ::read(rd.get(), buf, sizeof buf);
    if (got < 0 && errno == EINTR) {
      continue;
    }
    if (got <= 0) {
      break;  // EOF: the child exited (or exec'd nothing; it only exits)
    }
    if (errors.size() < 4096) {
      errors.append(buf, static_cast<std::size_t>(got));
    }
  }
  if (timed_out) {
    ::kill(pid, SIGKILL);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    spdlog::debug("slurm: no usable Slurm configuration here{}; libslurm not used: {}",
                  timed_out ? " (slurm_init took over 10 s)" : "", trim(errors));
    return false;
  }
  return true;
}

// Call with g_mutex held.
bool ensure_init_locked() {
  if (g_init == InitState::untried) {
    if (probe_init_in_child()) {
      slurm_init(nullptr);
      g_init = InitState::ok;
      spdlog::debug("slurm: libslurm initialised");
    } else {
      g_init = InitState::unavailable;
    }
  }
  return g_init == InitState::ok;
}

std::string slurm_error() {
  int e = slurm_get_errno();
  const char* s = slurm_strerror(e);
  return std::string(s ? s : "unknown error") + " (" + std::to_string(e) + ")";
}

std::optional<std::vector<std::string>> libslurm_expand(const std::string& list) {
  hostlist_t hl = slurm_hostlist_create(list.c_str());
  if (hl == nullptr) {
    return std::nullopt;
  }
  std::vector<std::string> out;
  while (char* h = slurm_hostlist_shift(hl)) {
    out.emplace_back(h);
    std::free(h);
  }
  slurm_hostlist_destroy(hl);
  // libslurm turns some malformed lists into names ("n[1-" gives "n]").
  for (const auto& h : out) {
    if (h.find_first_of("[]") != std::string::npos) {
      return std::nullopt;
    }
  }
  return out;
}

std::string state_string(std::uint32_t s) {
  // The same precedence as Slurm's job_state_string(): a flag names the state.
  if (s & JOB_COMPLETING) {
    return "COMPLETING";
  }
#ifdef JOB_STAGE_OUT
  if (s & JOB_STAGE_OUT) {
    return "STAGE_OUT";
  }
#endif
  if (s & JOB_CONFIGURING) {
    return "CONFIGURING";
  }
  if (s & JOB_RESIZING) {
    return "RESIZING";
  }
  if (s & JOB_REQUEUE) {
    return "REQUEUED";
  }
  if (s & JOB_STOPPED) {
    return "STOPPED";
  }
#ifdef JOB_SIGNALING
  if (s & JOB_SIGNALING) {
    return "SIGNALING";
  }
#endif
  return state_name(s & JOB_STATE_BASE);
}

std::string user_of(const slurm_job_info_t& j) {
  if (j.user_name && *j.user_name) {
    return j.user_name;
  }
  if (const passwd* pw = ::getpwuid(j.user_id)) {
    return pw->pw_name;
  }
  return std::to_string(j.user_id);
}

std::string str(const char* s) { return s ? std::string(s) : std::string(); }

JobInfo info_from_record(const slurm_job_info_t& j) {
  JobInfo out;
  out.job_id = std::to_string(j.job_id);
  out.name = str(j.name);
  out.state = state_string(j.job_state);
  out.reason = str(j.state_desc);
  out.user = user_of(j);
  out.partition = str(j.partition);
  out.nodes = str(j.nodes);
  if (!out.nodes.empty()) {
    if (auto hosts = libslurm_expand(out.nodes)) {
      out.node_list = std::move(*hosts);
    } else if (auto mine = expand_hostlist(out.nodes)) {
      out.node_list = std::move(*mine);
    }
  }
  out.num_nodes = j.num_nodes;
  if (j.time_limit != INFINITE && j.time_limit != NO_VAL) {
    out.time_limit = 60.0 * j.time_limit;
  }
  if (j.start_time > 0) {
    out.start_time = static_cast<std::int64_t>(j.start_time);
  }
  if (j.end_time > 0) {
    out.end_time = static_cast<std::int64_t>(j.end_time);
  }
  out.batch_host = str(j.batch_host);
  out.std_out = str(j.std_out);
  out.work_dir = str(j.work_dir);
  if (!out.active() && j.exit_code != NO_VAL) {
    int st = static_cast<int>(j.exit_code);
    out.exit_code = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
  }
  return out;
}

// Call with g_mutex held.
std::optional<JobInfo> load_job_locked(std::uint32_t id) {
  if (!ensure_init_locked()) {
    return std::nullopt;
  }
  job_info_msg_t* msg = nullptr;
  if (slurm_load_job(&msg, id, SHOW_DETAIL) != SLURM_SUCCESS || msg == nullptr) {
    spdlog::debug("slurm: slurm_load_job({}) failed: {}", id, slurm_error());
    return std::nullopt;
  }
  std::optional<JobInfo> out;
  for (std::uint32_t i = 0; i < msg->record_count; ++i) {
    if (msg->job_array[i].job_id == id) {
      out = info_from_record(msg->job_array[i]);
      break;
    }
  }
  slurm_free_job_info_msg(msg);
  if (!out) {
    spdlog::debug("slurm: job {} not in the controller's answer", id);
  }
  return out;
}

// Whether a job has a time limit changes only by `scontrol update`; asking
// once a minute (libslurm caches the end time as long) keeps a health loop
// that polls seconds_left() from loading the job record every few seconds.
// The last end time the controller gave stands in while it does not answer
// (slurmctld restarting or overloaded near the end is when drain matters).
struct LimitCache {
  bool limited = false;
  std::chrono::steady_clock::time_point when;
  std::optional<std::int64_t> end;  // unix seconds
};
std::map<std::uint32_t, LimitCache> g_limits;

#endif  // LHPC_HAVE_SLURM

}  // namespace

bool built_with_libslurm() noexcept { return LHPC_HAVE_SLURM != 0; }

bool libslurm_available() {
#if LHPC_HAVE_SLURM
  std::lock_guard lock(g_mutex);
  return ensure_init_locked();
#else
  return false;
#endif
}

bool in_allocation() { return job_id().has_value(); }

std::optional<std::string> job_id() {
  if (auto j = env("SLURM_JOB_ID")) {
    return j;
  }
  return env("SLURM_JOBID");
}

std::vector<std::string> node_list() {
  auto list = env("SLURM_JOB_NODELIST");
  if (!list) {
    list = env("SLURM_NODELIST");
  }
  if (!list) {
    return {};
  }
#if LHPC_HAVE_SLURM
  {
    // The hostlist functions need no configuration, so no slurm_init here.
    std::lock_guard lock(g_mutex);
    if (auto hosts = libslurm_expand(*list)) {
      return *hosts;
    }
  }
#endif
  if (auto hosts = expand_hostlist(*list)) {
    return *hosts;
  }
  spdlog::debug("slurm: cannot expand the node list '{}'", *list);
  return {};
}

std::optional<double> seconds_left([[maybe_unused]] const std::string& jobid) {
#if LHPC_HAVE_SLURM
  auto id_text = jobid.empty() ? job_id() : std::optional<std::string>(jobid);
  if (!id_text) {
    return std::nullopt;
  }
  auto id = numeric_job_id(*id_text);
  if (!id) {
    return std::nullopt;
  }
  std::lock_guard lock(g_mutex);
  if (!ensure_init_locked()) {
    return std::nullopt;
  }
  auto now = std::chrono::steady_clock::now();
  auto wall = static_cast<std::int64_t>(std::time(nullptr));
  auto left_until = [wall](std::int64_t end) { return end > wall ? static_cast<double>(end - wall) : 0.0; };
  auto& cache = g_limits[*id];
  std::optional<JobInfo> job;
  if (cache.when == std::chrono::steady_clock::time_point{} || now - cache.when > std::chrono::seconds(60)) {
    job = load_job_locked(*id);
    if (job) {
      cache.limited = job->time_limit.has_value();
      cache.when = now;
      if (job->end_time) {
        cache.end = job->end_time;
      }
    } else if (!cache.limited || !cache.end) {
      return std::nullopt;
    }
  }
  if (!cache.limited) {
    return std::nullopt;  // INFINITE: slurm_get_rem_time would answer "about a year"
  }
  long rem = slurm_get_rem_time(*id);
  if (rem >= 0) {
    cache.end = wall + rem;
    return static_cast<double>(rem);
  }
  spdlog::debug("slurm: slurm_get_rem_time({}) failed: {}", *id, slurm_error());
  if (cache.end) {
    return left_until(*cache.end);
  }
  return std::nullopt;
#else
  return std::nullopt;
#endif
}

struct TimeLeftWatch::State {
  mutable std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  bool asked = false;
  std::optional<std::chrono::steady_clock::time_point> end;  // nullopt: unknown or no limit
};

TimeLeftWatch::TimeLeftWatch(std::string jobid, std::chrono::milliseconds period) : m_state(std::make_shared<State>()) {
  m_thread = std::thread([st = m_state, jobid = std::move(jobid), period] {
    std::unique_lock lock(st->mu);
    while (!st->stop) {
      lock.unlock();
      auto left = seconds_left(jobid);
      auto now = std::chrono::steady_clock::now();
      lock.lock();
      // seconds_left() itself counts down from the last known end while the
      // controller does not answer; nullopt here means no limit (any more).
      if (left) {
        st->end = now + std::chrono::milliseconds(static_cast<std::int64_t>(*left * 1000));
      } else {
        st->end.reset();
      }
      st->asked = true;
      st->cv.wait_for(lock, period, [&] { return st->stop; });
    }
  });
}

TimeLeftWatch::~TimeLeftWatch() {
  {
    std::lock_guard lock(m_state->mu);
    m_state->stop = true;
  }
  m_state->cv.notify_all();
  if (m_thread.joinable()) {
    m_thread.join();
  }
}

std::optional<double> TimeLeftWatch::current() const {
  std::lock_guard lock(m_state->mu);
  if (!m_state->end) {
    return std::nullopt;
  }
  auto left = std::chrono::duration<double>(*m_state->end - std::chrono::steady_clock::now()).count();
  return left > 0 ? left : 0.0;
}

bool TimeLeftWatch::asked() const {
  std::lock_guard lock(m_state->mu);
  return m_state->asked;
}

bool JobInfo::active() const {
  static const char* const k_active[] = {"PENDING",  "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING",
                                         "RESIZING", "STOPPED", "SIGNALING", "STAGE_OUT",  "REQUEUED"};
  for (const char* s : k_active) {
    if (state == s) {
      return true;
    }
  }
  return false;
}

std::optional<JobInfo> job_info(const std::string& jobid) {
  auto mine = job_id();
  std::string id = jobid.empty() ? mine.value_or("") : jobid;
  if (id.empty()) {
    return std::nullopt;
  }
#if LHPC_HAVE_SLURM
  if (auto n = numeric_job_id(id)) {
    std::lock_guard lock(g_mutex);
    if (auto j = load_job_locked(*n)) {
      return j;
    }
  }
#endif
  if (mine && *mine == id) {
    return info_from_environment(id);
  }
  return std::nullopt;
}

std::optional<std::vector<std::string>> expand_hostlist(std::string_view list) {
  std::vector<std::string> out;
  std::size_t start = 0;
  int depth = 0;
  for (std::size_t i = 0; i <= list.size(); ++i) {
    char c = i < list.size() ? list[i] : ',';
    if (c == '[') {
      if (++depth > 1) {
        return std::nullopt;
      }
    } else if (c == ']') {
      if (--depth < 0) {
        return std::nullopt;
      }
    } else if (depth == 0 && (c == ',' || c == ' ' || c == '\t' || c == '\n')) {
      if (i > start && !expand_item(list.substr(start, i - start), out)) {
        return std::nullopt;
      }
      start = i + 1;
    }
  }
  if (depth != 0) {
    return std::nullopt;
  }
  return out;
}

std::string compress_hostlist(const std::vector<std::string>& hosts) {
  struct Range {
    std::uint64_t lo, hi;
    std::size_t width;  // 0: natural; else zero-padded to this many digits
  };
  struct Group {
    std::string prefix;
    std::vector<Range> ranges;
    std::string literal;  // a name without a numeric suffix
  };
  std::vector<Group> groups;
  for (const auto& h : hosts) {
    if (h.empty()) {
      continue;
    }
    auto digits_at = h.find_last_not_of("0123456789") + 1;  // npos + 1 == 0: all digits
    std::string_view digits = std::string_view(h).substr(digits_at);
    auto n = to_u64(digits);
    if (!n) {
      groups.push_back({.literal = h});
      continue;
    }
    std::size_t width = digits.size() > 1 && digits[0] == '0' ? digits.size() : 0;
    std::string prefix = h.substr(0, digits_at);
    if (groups.empty() || !groups.back().literal.empty() || groups.back().prefix != prefix) {
      groups.push_back({.prefix = prefix});
    }
    auto& ranges = groups.back().ranges;
    if (!ranges.empty()) {
      auto& r = ranges.back();
      bool same_width = r.width == 0 ? width == 0 : digits.size() == r.width;
      if (same_width && *n == r.hi + 1) {
        r.hi = *n;
        continue;
      }
    }
    ranges.push_back({*n, *n, width});
  }
  std::vector<std::string> parts;
  for (const auto& g : groups) {
    if (!g.literal.empty()) {
      parts.push_back(g.literal);
      continue;
    }
    std::vector<std::string> rs;
    for (const auto& r : g.ranges) {
      rs.push_back(r.lo == r.hi ? padded(r.lo, r.width) : padded(r.lo, r.width) + "-" + padded(r.hi, r.width));
    }
    if (g.ranges.size() == 1 && g.ranges[0].lo == g.ranges[0].hi) {
      parts.push_back(g.prefix + rs[0]);
    } else {
      parts.push_back(g.prefix + "[" + join(rs, ",") + "]");
    }
  }
  return join(parts, ",");
}

}  // namespace lhpc::slurm
