#include "health/view.h"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "util/json_number.h"
#include "util/strings.h"

namespace lhpc::health {

namespace {

using nlohmann::json;

// Typed access that names the key path on failure.
class Reader {
public:
  explicit Reader(std::string source) : m_source(std::move(source)) {}

  const json& at(const json& obj, const std::string& key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) {
      fail(where + key, "is missing");
    }
    return obj.at(key);
  }
  std::string str(const json& obj, const std::string& key, const std::string& where = {}) const {
    const auto& v = at(obj, key, where);
    if (!v.is_string()) {
      fail(where + key, "is not a string");
    }
    return v.get<std::string>();
  }
  double num(const json& obj, const std::string& key, const std::string& where = {}) const {
    auto v = json_real(at(obj, key, where));
    if (!v) {
      fail(where + key, "is not a number");
    }
    return *v;
  }
  unsigned long long count(const json& obj, const std::string& key, const std::string& where = {}) const {
    auto v = json_integer<unsigned long long>(at(obj, key, where));
    if (!v) {
      fail(where + key, json_integer_rule<unsigned long long>());
    }
    return *v;
  }
  bool boolean(const json& obj, const std::string& key, const std::string& where = {}) const {
    const auto& v = at(obj, key, where);
    if (!v.is_boolean()) {
      fail(where + key, "is not true or false");
    }
    return v.get<bool>();
  }
  // A state, by the names the writer uses; one it does not know is refused.
  template <typename S, std::size_t N>
  S state(const json& obj, const std::string& key, const std::string& where, const Names<S, N>& names) const {
    auto text = str(obj, key, where);
    if (auto s = names.parse(text)) {
      return *s;
    }
    fail(where + key, "is '" + text + "', not one of " + names.list());
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(Exit::failure, m_source + ": '" + key + "' " + what,
                "the file is written by lithops-hpc deploy; a different version may have written it");
  }

private:
  std::string m_source;
};

// "gpus": an array of slots, each an array of device ids (strings).
std::vector<std::vector<std::string>> read_gpus(const Reader& rd, const json& v, const std::string& key) {
  std::vector<std::vector<std::string>> slots;
  if (!v.is_array()) {
    rd.fail(key, "is not an array of slots");
  }
  for (const auto& slot : v) {
    if (!slot.is_array()) {
      rd.fail(key, "holds a slot that is not an array of device ids");
    }
    std::vector<std::string> ids;
    for (const auto& id : slot) {
      if (!id.is_string()) {
        rd.fail(key, "holds a device id that is not a string");
      }
      ids.push_back(id.get<std::string>());
    }
    slots.push_back(std::move(ids));
  }
  return slots;
}

// "gpu_memory": [{"gpu": id, "used_mib": n, "total_mib": n}].
std::vector<RankView::GpuMemory> read_gpu_memory(const Reader& rd, const json& v, const std::string& key) {
  std::vector<RankView::GpuMemory> out;
  if (!v.is_array()) {
    rd.fail(key, "is not an array");
  }
  for (const auto& g : v) {
    if (!g.is_object()) {
      rd.fail(key, "holds something that is not an object");
    }
    out.push_back(
        {rd.str(g, "gpu", key + "."), rd.count(g, "used_mib", key + "."), rd.count(g, "total_mib", key + ".")});
  }
  return out;
}

// "gpus_out": an array of slot numbers.
std::vector<int> read_slots(const Reader& rd, const json& v, const std::string& key) {
  std::vector<int> slots;
  if (!v.is_array()) {
    rd.fail(key, "is not an array of slot numbers");
  }
  for (const auto& k : v) {
    if (!k.is_number_unsigned() || k.get<unsigned long long>() > 63) {
      rd.fail(key, "holds something that is not a slot number (0 to 63)");
    }
    slots.push_back(k.get<int>());
  }
  return slots;
}

// "slot 0: 0, slot 1: 1 (out of service)" (a slot of several GPUs: "slot 0: 0+1").
std::string gpus_text(const std::vector<std::vector<std::string>>& slots, const std::vector<int>& out) {
  std::vector<std::string> parts;
  for (std::size_t k = 0; k < slots.size(); ++k) {
    bool gone = std::find(out.begin(), out.end(), static_cast<int>(k)) != out.end();
    parts.push_back(fmt::format("slot {}: {}{}", k, join(slots[k], "+"), gone ? " (out of service)" : ""));
  }
  return join(parts, ", ");
}

std::string ago(double seconds) {
  if (seconds < 0) {
    seconds = 0;
  }
  if (seconds < 10) {
    return fmt::format("{:.1f} s", seconds);
  }
  if (seconds < 120) {
    return fmt::format("{:.0f} s", seconds);
  }
  if (seconds < 7200) {
    return fmt::format("{:.0f} min", seconds / 60);
  }
  if (seconds < 172800) {
    return fmt::format("{:.0f} h", seconds / 3600);
  }
  return fmt::format("{:.0f} d", seconds / 86400);
}

// The BROKER column: yes, no, blocked (an alarm on the broker), or
// "no consumer" (connected, but the broker cancelled it: being restored).
std::string broker_text(const RankView& r) {
  if (!r.broker) {
    return "no";
  }
  if (r.blocked) {
    return "blocked";
  }
  return r.consuming ? "yes" : "no consumer";
}

std::string interval_text(double s) { return fmt::format("{:g} s", s); }

// " (runtime NAME)", or " (every runtime)" for a deployment that serves all.
std::string runtime_text(const StatusView& s) {
  return s.runtime.empty() ? " (every runtime)" : " (runtime " + s.runtime + ")";
}

std::string totals(const Summary& m) {
  return fmt::format("slots {}/{} busy; tasks {} done, {} failed, {} requeued, {} dead-lettered", m.slots_busy,
                     m.slots_total, m.done, m.failed, m.requeued, m.dead_lettered);
}

}  // namespace

namespace {

Summary read_summary(Reader& rd, const json& sm) {
  Summary m;
  m.ranks = static_cast<int>(rd.count(sm, "ranks", "summary."));
  m.ready = static_cast<int>(rd.count(sm, "ready", "summary."));
  m.degraded = static_cast<int>(rd.count(sm, "degraded", "summary."));
  m.unresponsive = static_cast<int>(rd.count(sm, "unresponsive", "summary."));
  m.slots_busy = static_cast<long long>(rd.count(sm, "slots_busy", "summary."));
  m.slots_total = static_cast<long long>(rd.count(sm, "slots_total", "summary."));
  m.done = rd.count(sm, "done", "summary.");
  m.failed = rd.count(sm, "failed", "summary.");
  m.requeued = rd.count(sm, "requeued", "summary.");
  m.dead_lettered = rd.count(sm, "dead_lettered", "summary.");
  return m;
}

// The GPU facts of one rank: each absent in a file written by an older
// lithops-hpc.
void read_rank_gpus(Reader& rd, const json& j, const std::string& w, RankView& r) {
  if (j.contains("gpus")) {
    r.gpus = read_gpus(rd, rd.at(j, "gpus", w), w + "gpus");
  }
  if (j.contains("gpu_memory")) {
    r.gpu_memory = read_gpu_memory(rd, rd.at(j, "gpu_memory", w), w + "gpu_memory");
  }
  if (j.contains("gpus_out")) {
    r.gpus_out = read_slots(rd, rd.at(j, "gpus_out", w), w + "gpus_out");
    r.gpus_out_why = rd.str(j, "gpus_out_why", w);
  }
}

// ranks[i]; `w` is "ranks[i]." for the messages.
RankView read_rank(Reader& rd, const json& j, const std::string& w) {
  RankView r;
  r.rank = static_cast<int>(rd.count(j, "rank", w));
  r.node = rd.str(j, "node", w);
  r.pid = static_cast<long>(rd.count(j, "pid", w));
  r.state = rd.state(j, "state", w, k_state_names);
  r.slots_busy = static_cast<int>(rd.count(j, "slots_busy", w));
  r.slots_total = static_cast<int>(rd.count(j, "slots_total", w));
  r.done = rd.count(j, "done", w);
  r.failed = rd.count(j, "failed", w);
  r.requeued = rd.count(j, "requeued", w);
  r.dead_lettered = rd.count(j, "dead_lettered", w);
  r.broker = rd.boolean(j, "broker", w);
  // Newer facts: absent in a file written by an older lithops-hpc.
  r.consuming = j.contains("consuming") ? rd.boolean(j, "consuming", w) : r.broker;
  r.blocked = j.contains("blocked") && rd.boolean(j, "blocked", w);
  r.duplicates = j.contains("duplicates") ? rd.count(j, "duplicates", w) : 0;
  r.instance = rd.boolean(j, "instance", w);
  r.restarts = static_cast<unsigned>(rd.count(j, "restarts", w));
  r.rss_kb = rd.count(j, "rss_kb", w);
  r.rss_tree_kb = rd.count(j, "rss_tree_kb", w);
  const auto& ls = rd.at(j, "last_seen", w);
  if (ls.is_number()) {
    r.last_seen = json_real(ls);
  } else if (!ls.is_null()) {
    rd.fail(w + "last_seen", "is neither a number nor null");
  }
  r.last_error = rd.str(j, "last_error", w);
  read_rank_gpus(rd, j, w, r);
  return r;
}

}  // namespace

StatusView parse_status(const std::string& text, const std::string& source) {
  json doc = json::parse(text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) {
    throw Error(Exit::failure, source + " is not a JSON object",
                "it is rewritten every interval by rank 0; if it stays broken, remove it");
  }
  Reader rd(source);
  StatusView s;
  s.version = static_cast<int>(rd.count(doc, "version"));
  if (s.version != k_status_version) {
    throw Error(Exit::failure,
                fmt::format("{}: status file version {} (this lithops-hpc reads version {})", source, s.version,
                            k_status_version),
                "use the lithops-hpc that runs the deployment");
  }
  s.job = rd.str(doc, "job");
  if (auto it = doc.find("runtime"); it != doc.end() && it->is_string()) {
    s.runtime = it->get<std::string>();
  }
  s.updated = rd.num(doc, "updated");
  s.started = rd.num(doc, "started");
  s.interval = rd.num(doc, "interval");
  const auto& r0 = rd.at(doc, "rank0", "");
  s.rank0_host = rd.str(r0, "host", "rank0.");
  s.rank0_pid = static_cast<long>(rd.count(r0, "pid", "rank0."));
  s.state = rd.state(doc, "state", "", k_deployment_state_names);
  s.summary = read_summary(rd, rd.at(doc, "summary", ""));
  const auto& ranks = rd.at(doc, "ranks", "");
  if (!ranks.is_array()) {
    rd.fail("ranks", "is not an array");
  }
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    s.ranks.push_back(read_rank(rd, ranks[i], fmt::format("ranks[{}].", i)));
  }
  return s;
}

Assessment assess(const StatusView& s, double now_unix) {
  Assessment a;
  a.age = now_unix - s.updated;
  const auto& m = s.summary;
  bool over = ended(s.state);
  a.stale = !over && a.age > k_unresponsive_intervals * s.interval;
  if (a.stale) {
    a.code = Exit::failure;
    a.headline = fmt::format(
        "job {}: DEGRADED: rank 0 ({}, pid {}) stopped updating the status file {} ago (interval {}): "
        "the deployment is gone or hung (check the batch log, squeue)",
        s.job, s.rank0_host, s.rank0_pid, ago(a.age), interval_text(s.interval));
    return a;
  }
  if (over) {
    a.code = Exit::failure;
    a.headline = fmt::format("job {}{}: {} {} ago; {}", s.job, runtime_text(s), k_deployment_state_names.text(s.state),
                             ago(a.age), totals(m));
    return a;
  }
  bool all_ready = m.ranks > 0 && m.ready == m.ranks && s.state == DeploymentState::running;
  a.code = all_ready ? Exit::ok : Exit::failure;
  std::string health = all_ready ? fmt::format("{}/{} ranks ready", m.ready, m.ranks)
                                 : fmt::format("DEGRADED: {}/{} ranks ready, {} degraded, {} unresponsive", m.ready,
                                               m.ranks, m.degraded, m.unresponsive);
  a.headline = fmt::format("job {}{}: {}, {}; {} (updated {} ago)", s.job, runtime_text(s),
                           k_deployment_state_names.text(s.state), health, totals(m), ago(a.age));
  return a;
}

std::string render(const StatusView& s, const Assessment& a) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"RANK", "NODE", "STATE", "SLOTS", "DONE", "FAILED", "REQUEUED", "BROKER", "INSTANCE", "RESTARTS",
                  "RSS", "LAST SEEN"});
  auto yn = [](bool b) { return std::string(b ? "yes" : "no"); };
  for (const auto& r : s.ranks) {
    rows.push_back({
        std::to_string(r.rank),
        r.node.empty() ? "-" : r.node,
        std::string(k_state_names.text(r.state)),
        fmt::format("{}/{}", r.slots_busy, r.slots_total),
        std::to_string(r.done),
        std::to_string(r.failed),
        std::to_string(r.requeued),
        broker_text(r),
        yn(r.instance),
        std::to_string(r.restarts),
        r.rss_tree_kb ? human_bytes(static_cast<double>(r.rss_tree_kb) * 1024.0) : "-",
        // Seconds ago when the file was written, plus the file's own age.
        r.last_seen ? ago(*r.last_seen + std::max(0.0, a.age)) + " ago" : "never",
    });
  }
  std::vector<std::size_t> width(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (std::size_t c = 0; c < row.size(); ++c) {
      width[c] = std::max(width[c], row[c].size());
    }
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) {
        line += std::string(width[c] - row[c].size() + 2, ' ');
      }
    }
    out += trim(line) + "\n";
  }
  for (const auto& r : s.ranks) {
    if (!r.gpus.empty()) {
      out += fmt::format("rank {} {}: GPUs: {}\n", r.rank, r.node, gpus_text(r.gpus, r.gpus_out));
    }
    if (!r.gpus_out.empty()) {
      out += fmt::format("rank {} {}: GPUs out of service: {}\n", r.rank, r.node, r.gpus_out_why);
    }
    if (!r.gpu_memory.empty()) {
      std::vector<std::string> parts;
      for (const auto& g : r.gpu_memory) {
        parts.push_back(fmt::format("{}: {}/{} MiB", g.gpu, g.used_mib, g.total_mib));
      }
      out += fmt::format("rank {} {}: GPU memory used: {}\n", r.rank, r.node, join(parts, ", "));
    }
  }
  for (const auto& r : s.ranks) {
    if (!r.last_error.empty()) {
      out += fmt::format("rank {} {}: last error: {}\n", r.rank, r.node, r.last_error);
    }
  }
  out += a.headline + "\n";
  return out;
}

}  // namespace lhpc::health
