#include "autoalloc/state_reader.h"

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_number.h"

namespace lhpc::autoalloc {

namespace {

using json = nlohmann::ordered_json;

// Sums of nodes over the jobs (status_line, the policy's supply) stay far
// inside an int: a controller holds nowhere near this many.
constexpr int k_max_job_nodes = 100000;
constexpr std::size_t k_max_jobs = 10000;

// The keys of one JSON object, each optional with a fallback; a key that is
// there but not of its type (by util/json_number's rules for numbers) is an
// Error naming the file and the key.
class Fields {
public:
  Fields(const json& obj, std::string where, const std::string& source)
      : m_obj(obj), m_where(std::move(where)), m_source(source) {
    if (!obj.is_object()) {
      fail("", "is not an object");
    }
  }
  template <class T>
  T integer(const char* key, T fallback) const {
    return number<T>(key).value_or(fallback);
  }
  template <class T>
  std::optional<T> number(const char* key) const {
    auto it = m_obj.find(key);
    if (it == m_obj.end() || it->is_null()) {
      return std::nullopt;
    }
    auto v = json_integer<T>(*it);
    if (!v) {
      fail(key, json_integer_rule<T>());
    }
    return v;
  }
  double real(const char* key, double fallback) const {
    auto it = m_obj.find(key);
    if (it == m_obj.end()) {
      return fallback;
    }
    auto v = json_real(*it);
    if (!v) {
      fail(key, "is not a number");
    }
    return *v;
  }
  std::string text(const char* key, const std::string& fallback) const { return typed(key, fallback); }
  bool flag(const char* key, bool fallback) const { return typed(key, fallback); }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(Exit::failure, m_source + ": '" + m_where + key + "' " + what,
                "move it aside; the controller adopts its jobs by name from squeue on its next start");
  }

private:
  template <class T>
  T typed(const char* key, const T& fallback) const {
    auto it = m_obj.find(key);
    if (it == m_obj.end()) {
      return fallback;
    }
    if constexpr (std::is_same_v<T, bool>) {
      if (!it->is_boolean()) {
        fail(key, "is not true or false");
      }
    } else {
      if (!it->is_string()) {
        fail(key, "is not a string");
      }
    }
    return it->template get<T>();
  }

  const json& m_obj;
  std::string m_where;
  const std::string& m_source;
};

JobRecord job_from_json(const json& j, const std::string& where, const std::string& source) {
  Fields f(j, where, source);
  JobRecord r;
  if (!j.contains("id")) {
    f.fail("id", "is missing");
  }
  r.id = f.text("id", "");
  auto nodes = f.number<int>("nodes");
  if (!nodes || *nodes < 0 || *nodes > k_max_job_nodes) {
    f.fail("nodes", "is not an integer from 0 to " + std::to_string(k_max_job_nodes));
  }
  r.nodes = *nodes;
  r.phase = k_phase_names.parse(f.text("phase", "pending")).value_or(Phase::pending);
  r.submitted = f.real("submitted", 0.0);
  r.out = f.text("out", "");
  r.runtime = f.text("runtime", "");
  r.renews = f.text("renews", "");
  r.ever_serving = f.flag("ever_serving", false);
  r.renewed = f.flag("renewed", false);
  r.stop_requested = f.flag("stop_requested", false);
  r.cancelled = f.flag("cancelled", false);
  r.idle.since = f.real("idle_since", 0.0);
  r.idle.done = f.integer<decltype(r.idle.done)>("done", 0);
  r.idle.started = r.idle.since > 0;
  return r;
}

void read_controller(State& s, const Fields& f) {
  s.controller = f.text("controller", "stopped");
  s.pid = f.integer<long>("pid", 0);
  s.host = f.text("host", "");
  s.started = f.real("started", 0.0);
  s.updated = f.real("updated", 0.0);
  s.next = f.text("next", "");
  s.error = f.text("error", "");
  s.last_refusal = f.text("last_refusal", "");
  s.refused_in_row = f.integer<int>("refused_in_row", 0);
  s.backoff_until = f.real("backoff_until", 0.0);
  s.start_failures.in_row = f.integer<decltype(s.start_failures.in_row)>("start_failures_in_row", 0);
  s.start_failures.halted = f.flag("halted", false);
  s.start_failures.halted_at = f.real("halted_at", 0.0);
  s.slots_per_node = f.integer<int>("slots_per_node", 0);
}

}  // namespace

State state_from_json(const std::string& text, const std::string& source) {
  try {
    auto j = json::parse(text);
    Fields top(j, "", source);
    State s;
    const auto& jobs = j.at("jobs");
    if (!jobs.is_array() || jobs.size() > k_max_jobs) {
      top.fail("jobs", "is not a list of at most " + std::to_string(k_max_jobs) + " jobs");
    }
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      s.jobs.push_back(job_from_json(jobs.at(i), "jobs[" + std::to_string(i) + "].", source));
    }
    read_controller(s, top);
    s.start_failures.outputs = j.value("failed_outputs", std::vector<std::string>{});
    Fields demand(j.at("demand"), "demand.", source);
    s.demand_seen = demand.real("seen", 0.0);
    s.ready = demand.number<std::uint64_t>("ready");
    s.consumers = demand.number<int>("consumers");
    if (j.contains("counters")) {
      Fields c(j["counters"], "counters.", source);
      s.sbatch_calls = c.integer<unsigned long long>("sbatch_calls", 0);
      s.broker_queries = c.integer<unsigned long long>("broker_queries", 0);
      s.polls = c.integer<unsigned long long>("polls", 0);
      s.scheduler_queries = c.integer<unsigned long long>("scheduler_queries", 0);
    }
    return s;
  } catch (const json::exception& e) {
    throw Error(Exit::failure, source + ": not an autoalloc state file: " + e.what(),
                "move it aside; the controller adopts its jobs by name from squeue on its next start");
  }
}

std::string controller_dir() { return state_dir() + "/autoalloc"; }

std::optional<std::string> read_state_text() {
  return read_private_file(controller_dir() + "/state.json", k_max_state_bytes);
}

std::optional<State> load_state() {
  auto text = read_state_text();
  if (!text) {
    return std::nullopt;
  }
  return state_from_json(*text, controller_dir() + "/state.json");
}

}  // namespace lhpc::autoalloc
