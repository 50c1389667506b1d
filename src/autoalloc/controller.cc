#include "autoalloc/controller.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>

#include "config/config.h"
#include "dispatch/runtime.h"
#include "health/report.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/signals.h"
#include "util/strings.h"

namespace lhpc::autoalloc {

namespace {

using json = nlohmann::ordered_json;

json job_to_json(const JobRecord& r) {
  json j = {{"id", r.id},
            {"runtime", r.runtime},
            {"nodes", r.nodes},
            {"phase", k_phase_names.text(r.phase)},
            {"submitted", r.submitted},
            {"out", r.out},
            {"renews", r.renews},
            {"ever_serving", r.ever_serving},
            {"renewed", r.renewed},
            {"stop_requested", r.stop_requested},
            {"cancelled", r.cancelled},
            {"ready_ranks", r.ready_ranks},
            {"slots_total", r.slots_total},
            {"slots_busy", r.slots_busy},
            {"idle_since", r.idle.since},
            {"done", r.idle.done}};
  j["seconds_left"] = r.seconds_left ? json(*r.seconds_left) : json(nullptr);
  return j;
}

json runtimes_json(const std::vector<RuntimeDemand>& rts) {
  json out = json::array();
  for (const auto& r : rts) {
    out.push_back({{"runtime", r.runtime},
                   {"sif", r.sif},
                   {"image", r.image},
                   {"ready", r.ready ? json(*r.ready) : json(nullptr)},
                   {"seen", r.seen}});
  }
  return out;
}

json limits_json(const Limits& l) {
  return {{"max_nodes", l.max_nodes},
          {"nodes_per_job", l.nodes_per_job},
          {"max_pending", l.max_pending},
          {"min_nodes", l.min_nodes},
          {"idle_timeout", l.idle_timeout},
          {"renew_before", l.renew_before},
          {"max_start_failures", l.max_start_failures}};
}

// The runtimes whose image is in `dir`: <name>.sif with a valid runtime name.
std::vector<std::string> images_in(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    auto name = it->path().filename().string();
    if (name.size() > 4 && name.ends_with(".sif")) {
      name.resize(name.size() - 4);
      if (!config::runtime_name_problem(name)) {
        out.push_back(name);
      }
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::string to_json(const State& s) {
  json jobs = json::array();
  for (const auto& r : s.jobs) {
    jobs.push_back(job_to_json(r));
  }
  Snapshot snap;
  for (const auto& r : s.jobs) {
    snap.jobs.push_back({r.id, r.phase, r.nodes, r.ready_ranks, r.slots_total, r.slots_busy});
  }
  auto sp = supply_of(snap);
  json j = {
      {"version", 1},
      {"controller", s.controller},
      {"job_name", job_name()},
      {"pid", s.pid},
      {"host", s.host},
      {"started", s.started},
      {"updated", s.updated},
      {"demand",
       {{"ready", s.ready ? json(*s.ready) : json(nullptr)},
        {"consumers", s.consumers ? json(*s.consumers) : json(nullptr)},
        {"seen", s.demand_seen}}},
      {"supply",
       {{"held_nodes", sp.held_nodes},
        {"pending_jobs", sp.pending_jobs},
        {"serving_nodes", sp.serving_nodes},
        {"free_slots", sp.free_slots},
        {"busy_slots", sp.busy_slots}}},
      {"runtimes", runtimes_json(s.runtimes)},
      {"next", s.next},
      {"error", s.error},
      {"last_refusal", s.last_refusal},
      {"refused_in_row", s.refused_in_row},
      {"backoff_until", s.backoff_until},
      {"start_failures_in_row", s.start_failures.in_row},
      {"failed_outputs", s.start_failures.outputs},
      {"halted", s.start_failures.halted},
      {"halted_at", s.start_failures.halted_at},
      {"slots_per_node", s.slots_per_node},
      {"limits", limits_json(s.limits)},
      {"counters",
       {{"sbatch_calls", s.sbatch_calls},
        {"broker_queries", s.broker_queries},
        {"polls", s.polls},
        {"scheduler_queries", s.scheduler_queries}}},
      {"jobs", jobs},
  };
  return j.dump(2) + "\n";
}

std::string job_name() {
  auto h = std::hash<std::string>{}(state_dir());
  return fmt::format("lithops-aa-{:08x}", static_cast<std::uint32_t>(h));
}

std::string status_line(const State& s, double now) {
  int held = 0, serving = 0, pending = 0;
  for (const auto& r : s.jobs) {
    held += r.phase == Phase::ended ? 0 : r.nodes;
    serving += r.phase == Phase::serving ? 1 : 0;
    pending += r.phase == Phase::pending ? 1 : 0;
  }
  std::string who = s.controller == "running" && now - s.updated > 60
                        ? fmt::format("not updated for {:.0f} s", now - s.updated)
                        : s.controller;
  auto line = fmt::format(
      "autoalloc ({}, pid {} on {}): demand {} ready, {} consumer(s); supply {} job(s), "
      "{} node(s) held, {} serving, {} pending; next: {}",
      who, s.pid, s.host, s.ready ? std::to_string(*s.ready) : "?", s.consumers ? std::to_string(*s.consumers) : "?",
      s.jobs.size(), held, serving, pending, s.next);
  for (const auto& r : s.runtimes) {
    if (!r.image) {
      line += fmt::format("\n  runtime {}: no image at {} ({} task(s) ready): not submitted", r.runtime, r.sif,
                          r.ready ? std::to_string(*r.ready) : "?");
    }
  }
  if (!s.error.empty()) {
    line += "\n  error: " + s.error;
  }
  return line;
}

// ---------------------------------------------------------------- Controller

Controller::Controller(Settings s, Ports p) : m_s(std::move(s)), m_p(std::move(p)), m_dir(controller_dir()) {
  if (!m_p.clock) {
    m_p.clock = health::unix_now;
  }
  if (!m_p.list_images) {
    m_p.list_images = images_in;
  }
  if (!path_exists(state_dir())) {
    make_private_dir(state_dir());
  }
  make_private_dir(m_dir);
  mkdirs(m_dir + "/out", 0700);
  auto lock = m_dir + "/lock";
  m_lock = UniqueFd(::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (m_lock.get() < 0) {
    throw Error(Exit::failure, "cannot open " + lock + ": " + errno_text(errno));
  }
  if (::flock(m_lock.get(), LOCK_EX | LOCK_NB) != 0) {
    auto prev = load_state();
    throw Error(Exit::usage,
                fmt::format("another autoalloc controller runs for {} (pid {} on {})", state_dir(),
                            prev ? prev->pid : 0, prev ? prev->host : "?"),
                "one controller per state directory: stop the other (SIGTERM) or set LITHOPS_HPC_STATE_DIR");
  }
  if (auto prev = load_state()) {
    m_state = *prev;
  }
  m_earlier = {m_state.sbatch_calls, m_state.broker_queries, m_state.scheduler_queries};
  // A restart is the user's answer to a halt: try again, from a clean count.
  m_state.start_failures = {};
  m_state.error.clear();
  m_state.controller = "running";
  m_state.pid = ::getpid();
  m_state.host = config::short_hostname();
  m_state.started = now();
  m_state.limits = m_s.limits;
  take_runtimes();
}

void Controller::take_runtimes() {
  auto rts = m_s.runtimes.empty() ? std::vector<RuntimeImage>{{"", m_s.sif}} : m_s.runtimes;
  m_state.runtimes.clear();
  for (const auto& r : rts) {
    m_state.runtimes.push_back({r.runtime, r.sif});
  }
  // Jobs of a runtime no longer served (another configuration before a
  // restart) are the first runtime's: retired when idle like any other.
  for (auto& j : m_state.jobs) {
    if (std::none_of(rts.begin(), rts.end(), [&](const RuntimeImage& r) { return r.runtime == j.runtime; })) {
      j.runtime = rts.front().runtime;
    }
  }
}

Controller::~Controller() = default;

double Controller::now() const { return m_p.clock(); }

void Controller::save() {
  m_state.updated = now();
  auto sc = m_p.scheduler->counters();
  m_state.sbatch_calls = m_earlier.sbatch + sc.submissions;
  m_state.scheduler_queries = m_earlier.scheduler + sc.queries;
  m_state.broker_queries = m_earlier.broker + m_p.queue->queries();
  write_file_atomic(m_dir + "/state.json", to_json(m_state), 0600);
}

void Controller::adopt() {
  std::vector<std::string> known;
  for (const auto& r : m_state.jobs) {
    known.push_back(r.id);
  }
  int taken = 0;
  for (const auto& id : m_p.scheduler->jobs_named(job_name())) {
    if (std::find(known.begin(), known.end(), id) == known.end()) {
      spdlog::warn("adopting job {}: it carries this controller's name ({}) but was not in its state", id, job_name());
      JobRecord r;
      r.id = id;
      r.runtime = m_state.runtimes.front().runtime;  // the name does not say which
      r.nodes = m_s.limits.nodes_per_job;
      r.submitted = now();
      m_state.jobs.push_back(r);
      ++taken;
    }
  }
  if (!m_state.jobs.empty()) {
    spdlog::info("adopted {} job(s) from {}/state.json and the scheduler ({} by name)", m_state.jobs.size(), m_dir,
                 taken);
  }
}

void Controller::observe_jobs() {
  std::vector<std::string> ids;
  for (const auto& r : m_state.jobs) {
    ids.push_back(r.id);
  }
  if (ids.empty()) {
    return;
  }
  auto seen = m_p.scheduler->query(ids);
  if (!seen) {
    return;  // the scheduler did not answer: keep what we knew
  }
  for (auto& r : m_state.jobs) {
    auto it = seen->find(r.id);
    if (it == seen->end() || it->second.ended) {
      r.phase = Phase::ended;
      continue;
    }
    r.nodes = it->second.nodes > 0 ? it->second.nodes : r.nodes;
    r.seconds_left = it->second.seconds_left;
    if (it->second.pending) {
      r.phase = Phase::pending;
    } else if (r.phase == Phase::pending) {
      r.phase = Phase::starting;
    }
  }
}

void Controller::observe_deployments(double now) {
  for (auto& r : m_state.jobs) {
    if (r.phase == Phase::pending || r.phase == Phase::ended) {
      continue;
    }
    auto d = m_p.deployments->look(r.id);
    if (d.seen == DeploymentLook::Seen::nothing) {
      r.phase = r.stop_requested ? Phase::draining : Phase::starting;
      continue;
    }
    if (d.seen == DeploymentLook::Seen::unreadable) {
      continue;
    }
    r.ready_ranks = d.ready_ranks;
    r.slots_total = d.slots_total;
    r.slots_busy = d.slots_busy;
    if (d.winding_down || r.stop_requested) {
      r.phase = Phase::draining;
    } else if (r.ready_ranks > 0) {
      r.phase = Phase::serving;
      if (!r.ever_serving) {
        account_served(r);
      }
    } else {
      r.phase = Phase::starting;
    }
    if (r.phase == Phase::serving) {
      observe_idle(r.idle, now, r.slots_busy, d.done);
    }
  }
}

void Controller::observe_queue(double now) {
  auto look = m_p.queue->look();
  m_state.ready.reset();
  m_state.consumers.reset();
  if (!look) {
    return;
  }
  m_state.ready = look->ready;
  m_state.consumers = look->consumers;
  if (look->ready > 0) {
    m_state.demand_seen = now;
  }
}
void Controller::observe_runtimes(double now) {
  for (std::size_t i = 0; i < m_state.runtimes.size(); ++i) {
    auto& rt = m_state.runtimes[i];
    // A named runtime's image is looked for; one image given alone (no
    // runtime) is the template's to check, as before runtimes.
    rt.image = rt.runtime.empty() || (m_p.image_exists ? m_p.image_exists(rt.sif) : path_exists(rt.sif));
    std::optional<std::uint64_t> task_queue = i == 0 ? m_state.ready : std::optional<std::uint64_t>(0);
    if (rt.runtime.empty()) {
      rt.ready = task_queue;  // one runtime, the image's: the task queue is all of its demand
    } else {
      auto look = m_p.queue->look_runtime(rt.runtime);
      rt.ready = look && task_queue ? std::optional<std::uint64_t>(look->ready + *task_queue) : std::nullopt;
      rt.consumers = look ? std::optional<int>(look->consumers) : std::nullopt;
    }
    if (rt.ready && *rt.ready > 0) {
      rt.seen = now;
      if (!rt.image) {
        spdlog::warn("runtime {}: {} task(s) ready but no image at {}: not submitted", rt.runtime, *rt.ready, rt.sif);
      }
    }
  }
  // Tasks running count as demand too: a stream that the prefetch empties at
  // once leaves no ready message, and a pending successor is still needed.
  for (const auto& r : m_state.jobs) {
    if (r.slots_busy > 0) {
      m_state.demand_seen = now;
      for (auto& rt : m_state.runtimes) {
        rt.seen = rt.runtime == r.runtime ? now : rt.seen;
      }
    }
  }
}

void Controller::account_ended(JobRecord& r) {
  if (r.ever_serving) {
    spdlog::info("job {} ended", r.id);
    return;
  }
  if (r.cancelled || r.stop_requested) {
    spdlog::info("job {} ended before serving (cancelled by the controller)", r.id);
    return;
  }
  auto& f = m_state.start_failures;
  bool halts = on_start_failure(f, r.out, now(), m_s.limits);
  spdlog::error("job {} ended before any rank was ready ({} in a row); see {}", r.id, f.in_row, r.out);
  if (halts) {
    std::string files;
    for (const auto& out : f.outputs) {
      files += (files.empty() ? "" : ", ") + out;
    }
    m_state.error = fmt::format(
        "{} jobs in a row ended before serving: no more submissions for {:.0f} s (or until a job serves); see "
        "their output: {}; fix the cause and restart lithops-hpc autoalloc to try again at once",
        f.in_row, m_s.limits.halt_cooloff, files);
    spdlog::error("{}", m_state.error);
  }
}

// The first time a job serves: a row of start failures is broken (and a halt lifted).
void Controller::account_served(JobRecord& r) {
  r.ever_serving = true;
  if (on_served(m_state.start_failures)) {
    m_state.error.clear();
    spdlog::info("job {} serves: submissions resume after the halt for start failures", r.id);
  }
}

void Controller::lift_halt_after_cooloff(double now) {
  if (cool_off(m_state.start_failures, now, m_s.limits)) {
    m_state.error.clear();
    spdlog::warn(
        "halt for start failures lifted after {:.0f} s: one job is tried; if it fails at start too, "
        "submissions halt again",
        m_s.limits.halt_cooloff);
  }
}

Snapshot Controller::snapshot(double now, const RuntimeDemand* rt) const {
  Snapshot s;
  s.now = now;
  s.ready = rt ? rt->ready : m_state.ready;
  s.consumers = m_state.consumers;
  double seen = rt ? rt->seen : m_state.demand_seen;
  s.demand_idle_for = seen > 0 ? now - seen : now - m_state.started;
  s.default_slots_per_node = m_s.default_slots;
  s.backoff_until = m_state.backoff_until;
  s.halted = m_state.start_failures.halted;
  s.learned_slots_per_node = m_state.slots_per_node;
  for (const auto& r : m_state.jobs) {
    if (rt && r.runtime != rt->runtime) {
      continue;
    }
    JobSnapshot j{r.id, r.phase, r.nodes, r.ready_ranks, r.slots_total, r.slots_busy, r.seconds_left};
    j.idle_for = r.idle.started ? now - r.idle.since : 0;
    j.stop_requested = r.stop_requested;
    j.renewed = r.renewed;
    s.jobs.push_back(j);
  }
  return s;
}

Limits Controller::limits_left_for(const std::string& runtime, bool first) const {
  Limits l = m_s.limits;
  for (const auto& r : m_state.jobs) {
    if (r.runtime == runtime || r.phase == Phase::ended) {
      continue;
    }
    l.max_nodes -= r.nodes;
    l.max_pending -= r.phase == Phase::pending ? 1 : 0;
  }
  if (!first) {
    l.min_nodes = 0;  // kept warm for the first runtime only
  }
  return l;
}

std::string Controller::decide_per_runtime(double now) {
  auto held = [&](const std::string& runtime) {
    int n = 0;
    for (const auto& r : m_state.jobs) {
      n += r.runtime == runtime && r.phase != Phase::ended ? r.nodes : 0;
    }
    return n;
  };
  std::vector<std::size_t> order(m_state.runtimes.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return held(m_state.runtimes[a].runtime) < held(m_state.runtimes[b].runtime);
  });
  std::string next;
  for (auto i : order) {
    const RuntimeDemand rt = m_state.runtimes[i];  // a copy: submit() adds jobs
    auto d = decide(snapshot(now, &rt), limits_left_for(rt.runtime, i == 0));
    std::string says = d.next;
    for (const auto& a : d.actions) {
      if (a.kind == ActionKind::submit && !rt.image) {
        says = fmt::format("not submitting: no image at {} (wanted: {})", rt.sif, a.why);
        continue;
      }
      carry_out(a, now, rt);
    }
    if (m_state.runtimes.size() > 1) {
      says = "runtime " + rt.runtime + ": " + says;
    }
    next += (next.empty() ? "" : "; ") + says;
  }
  return next;
}

void Controller::submit(const Action& a, double now, const RuntimeDemand& rt) {
  Submission req{rt.sif, a.nodes, job_name(), m_dir + "/out", m_s.config_path, rt.runtime};
  req.gpus_per_slot = m_s.gpus_per_slot;
  req.gpu_slots = m_s.default_slots;
  req.gpu_vendor = m_s.gpu_vendor;
  for (const auto& r : m_s.runtimes) {  // GPU runtimes per runtime, from each image's labels
    if (r.runtime == rt.runtime) {
      req.gpus_per_slot = r.gpus_per_slot.value_or(req.gpus_per_slot);
      req.gpu_vendor = r.gpu_vendor.value_or(req.gpu_vendor);
    }
  }
  auto res = m_p.scheduler->submit(req);
  if (!res.job) {
    ++m_state.refused_in_row;
    m_state.last_refusal = res.message;
    double wait = backoff_delay(m_state.refused_in_row, m_s.limits);
    m_state.backoff_until = now + wait;
    m_state.error = fmt::format("the scheduler refused the submission ({} in a row): {}; next try in {:.0f} s",
                                m_state.refused_in_row, res.message, wait);
    spdlog::error("{}", m_state.error);
    if (res.maybe_submitted) {
      adopt();  // a job it made anyway carries our name
    }
    return;
  }
  m_state.refused_in_row = 0;
  m_state.backoff_until = 0;
  if (!m_state.start_failures.halted) {
    m_state.error.clear();
  }
  JobRecord r;
  r.id = *res.job;
  r.runtime = rt.runtime;
  r.nodes = a.nodes;
  r.submitted = now;
  r.out = res.output;
  r.renews = a.job;
  m_state.jobs.push_back(r);
  for (auto& old : m_state.jobs) {
    if (old.id == a.job) {
      old.renewed = true;
    }
  }
  spdlog::info("submitted job {} ({}{}): {}", r.id, res.request.empty() ? "-N " + std::to_string(a.nodes) : res.request,
               rt.runtime.empty() ? "" : ", runtime " + rt.runtime, a.why);
}

void Controller::carry_out(const Action& a, double now, const RuntimeDemand& rt) {
  if (a.kind == ActionKind::submit) {
    save();  // counters first: a kill during sbatch is found by name, not by the state
    submit(a, now, rt);
    return;
  }
  for (auto& r : m_state.jobs) {
    if (r.id != a.job) {
      continue;
    }
    if (a.kind == ActionKind::retire) {
      m_p.deployments->request_stop(r.id);
      r.stop_requested = true;
      r.phase = Phase::draining;
      spdlog::info("retiring job {}: {}", r.id, a.why);
    } else {
      m_p.scheduler->cancel(r.id);
      r.cancelled = true;
      spdlog::info("cancelled job {}: {}", r.id, a.why);
    }
  }
}

std::vector<KnownRuntime> Controller::known_runtimes() const {
  std::vector<KnownRuntime> known;
  auto exists = [&](const std::string& sif) { return m_p.image_exists ? m_p.image_exists(sif) : path_exists(sif); };
  auto add = [&](const std::string& name) {
    if (std::none_of(known.begin(), known.end(), [&](const KnownRuntime& k) { return k.runtime == name; })) {
      auto sif = m_s.sif_path + "/" + name + ".sif";
      known.push_back({name, sif, exists(sif)});
    }
  };
  for (const auto& rt : m_state.runtimes) {
    if (!rt.runtime.empty()) {
      known.push_back({rt.runtime, rt.sif, rt.image});
    }
  }
  if (!m_s.sif_path.empty()) {
    for (const auto& name : m_p.list_images(m_s.sif_path)) {
      add(name);
    }
    for (const auto& name : lithops_default_runtimes()) {
      add(name);
    }
  }
  return known;
}

bool Controller::tell(const Handling& h) {
  auto why = m_p.store->put(h.storage, h.entries);
  auto what = bounded_for_log(h.message, 600);
  auto calls = h.runtime.empty() ? std::string() : fmt::format("; {} call(s) failed", h.entries.size());
  if (why) {
    spdlog::error("{}; the client cannot be told{}: {}", what, h.runtime.empty() ? "" : " of its tasks",
                  bounded_for_log(*why, 300));
    return false;
  }
  spdlog::error("{} (the client was told{})", what, calls);
  return true;
}

void Controller::take_from(QueueProbe::Source from, const std::string& runtime,
                           std::optional<std::vector<KnownRuntime>>& known) {
  using S = QueueProbe::Source;
  const From where = from == S::task_queue ? From::task_queue : from == S::copies ? From::copies : From::runtime_queue;
  for (int i = 0; i < k_take_per_poll; ++i) {
    auto t = m_p.queue->take(from, runtime);
    if (!t) {
      return;
    }
    if (!known) {
      known = known_runtimes();  // a directory listing: only once something was taken
    }
    if (!t->wanted.empty()) {
      learn(t->wanted, *known);  // a notice, never a request (only the copies queue gets them)
      m_p.queue->settle(from, t->tag, true);
      continue;
    }
    auto h = handle(t->body, where, *known, m_s.sif_path, now());
    if (h.take == Take::leave) {
      m_p.queue->settle(from, t->tag, false);
      return;
    }
    if (h.take == Take::drop || tell(h) || h.runtime.empty()) {
      m_p.queue->settle(from, t->tag, true);  // a get_metadata's error is written once, or never
      continue;
    }
    // Tasks the client cannot be told about wait in their runtime's queue,
    // reported there, and the task queue behind them is read on.
    bool moved = from == S::task_queue && m_p.queue->move(h.runtime, t->body);
    m_p.queue->settle(from, t->tag, moved);
    if (!moved) {
      return;
    }
  }
}

void Controller::learn(const std::string& runtime, const std::vector<KnownRuntime>& known) {
  if (!dispatch::task_runtime(runtime) || m_wanted.contains(runtime)) {
    return;
  }
  auto k = std::find_if(known.begin(), known.end(), [&](const KnownRuntime& r) { return r.runtime == runtime; });
  if (k != known.end() && k->image) {
    spdlog::info("runtime {}: a deployment moved tasks to its queue, which nothing consumes; its image {} exists",
                 runtime, k->sif);
    return;
  }
  if (m_wanted.size() >= k_max_wanted) {
    m_wanted.erase(m_wanted.begin());  // bounded: a flood of names forgets some
  }
  m_wanted.insert(runtime);
  spdlog::warn(
      "runtime {}: a deployment moved tasks to its queue, which nothing consumes, and it has no image ({}): "
      "its tasks fail",
      runtime, k != known.end() ? k->sif : m_s.sif_path + "/" + runtime + ".sif");
}

void Controller::answer_missing_images() {
  const auto& rts = m_state.runtimes;
  if (!m_p.store || std::all_of(rts.begin(), rts.end(), [](const RuntimeDemand& r) { return r.runtime.empty(); })) {
    return;  // one image that names no runtime: every request is its own
  }
  std::optional<std::vector<KnownRuntime>> known;
  take_from(QueueProbe::Source::copies, {}, known);
  for (const auto& rt : rts) {
    if (!rt.runtime.empty() && !rt.image && rt.consumers == 0 && rt.ready.value_or(0) > 0) {
      take_from(QueueProbe::Source::runtime_queue, rt.runtime, known);
    }
  }
  // Learned runtimes: until an image appears (then a deployment will come).
  for (auto it = m_wanted.begin(); it != m_wanted.end();) {
    if (!known) {
      known = known_runtimes();
    }
    const std::string rt = *it;
    bool ours = std::any_of(rts.begin(), rts.end(), [&](const RuntimeDemand& r) { return r.runtime == rt; });
    bool image =
        std::any_of(known->begin(), known->end(), [&](const KnownRuntime& k) { return k.runtime == rt && k.image; });
    if (ours || image) {
      it = m_wanted.erase(it);
      continue;
    }
    take_from(QueueProbe::Source::runtime_queue, rt, known);
    ++it;
  }
  // The task queue's demand is the first runtime's: when it has no image
  // and, after this poll's decision, no job of ours and no consumer is
  // there, no deployment will move its messages. Only requests for a
  // runtime with no image are taken; the first other message goes back.
  if (!rts.front().image && m_state.jobs.empty() && m_state.consumers == 0 && m_state.ready.value_or(0) > 0) {
    take_from(QueueProbe::Source::task_queue, {}, known);
  }
}

void Controller::poll() {
  double now = this->now();
  ++m_state.polls;
  observe_jobs();
  observe_deployments(now);
  for (auto& r : m_state.jobs) {
    if (r.phase == Phase::ended) {
      account_ended(r);
    }
  }
  std::erase_if(m_state.jobs, [](const JobRecord& r) { return r.phase == Phase::ended; });
  observe_queue(now);
  observe_runtimes(now);
  lift_halt_after_cooloff(now);
  auto snap = snapshot(now, nullptr);
  if (std::any_of(snap.jobs.begin(), snap.jobs.end(), [](const JobSnapshot& j) { return j.phase == Phase::serving; })) {
    m_state.slots_per_node = supply_of(snap).slots_per_node;  // remembered across scale to zero and restarts
  }
  auto next = decide_per_runtime(now);
  m_state.next = m_state.start_failures.halted ? "halted: " + m_state.error : next;
  answer_missing_images();
  save();
}

bool Controller::at_zero() const { return m_state.jobs.empty() && !m_state.start_failures.halted; }

// A quick look between polls: tasks ready where the last poll saw none, in
// the task queue or in the queue of a runtime with an image (what another
// controller's or a hand-made deployment moved there). A backlog the last
// poll saw already (served by someone else's workers, or waiting out a
// backoff) waits for the next poll as before.
bool Controller::first_tasks() {
  auto look = m_p.queue->look();
  if (look && look->ready > 0 && m_state.ready.value_or(0) == 0) {
    return true;
  }
  for (const auto& rt : m_state.runtimes) {
    if (rt.runtime.empty() || !rt.image) {
      continue;
    }
    auto q = m_p.queue->look_runtime(rt.runtime);
    if (q && q->ready > 0 && rt.ready.value_or(0) == 0) {
      return true;
    }
  }
  return false;
}

double Controller::tick() {
  double t = now();
  if (t >= m_next_poll || (at_zero() && first_tasks())) {
    poll();
    t = now();
    m_next_poll = t + m_s.poll;
  }
  double wait = std::max(0.0, m_next_poll - t);
  return at_zero() ? std::min(wait, k_zero_look) : wait;
}

void Controller::finish(bool drain) {
  m_state.controller = "stopped";
  m_state.next = drain ? "ended (SIGTERM): deployments asked to stop (--drain-on-exit)"
                       : "ended (SIGTERM): no more submissions; deployments keep serving";
  if (drain) {
    for (auto& r : m_state.jobs) {
      if (r.phase == Phase::serving || r.phase == Phase::draining) {
        if (!r.stop_requested) {
          m_p.deployments->request_stop(r.id);
          r.stop_requested = true;
        }
      } else if (r.phase != Phase::ended) {
        m_p.scheduler->cancel(r.id);
        r.cancelled = true;
      }
      spdlog::info("job {}: asked to stop", r.id);
    }
  }
  save();
}

Exit Controller::run() {
  SignalPipe signals({SIGINT, SIGTERM});
  adopt();
  spdlog::info("autoalloc: queue '{}' on {}; at most {} node(s), {} per job, {} pending; state in {}", m_s.queue,
               m_s.broker.url.empty() ? "?" : config::redact_url(m_s.broker.url), m_s.limits.max_nodes,
               m_s.limits.nodes_per_job, m_s.limits.max_pending, m_dir);
  int sig = 0;
  while (sig == 0) {
    double wait = tick();
    pollfd p{.fd = signals.fd(), .events = POLLIN};
    // Rounded up: waking a millisecond early would cost a look at the queue before the due poll.
    if (::poll(&p, 1, static_cast<int>(std::ceil(wait * 1000))) > 0) {
      for (int s : signals.drain()) {
        sig = s;
      }
    }
  }
  spdlog::info("autoalloc: {} received; {}", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               m_s.drain_on_exit ? "stopping the deployments (--drain-on-exit)" : "leaving the deployments serving");
  finish(m_s.drain_on_exit);
  return exit_for_signal(sig);
}

}  // namespace lhpc::autoalloc
