#include "health/table.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>

namespace lhpc::health {

namespace {

double round_to(double x, double unit) { return std::round(x / unit) * unit; }

}  // namespace

bool ended(DeploymentState s) { return s == DeploymentState::stopped || s == DeploymentState::failed; }

Clock Clock::system() {
  return Clock{
      .mono = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); },
      .wall = [] { return unix_now(); },
  };
}

Table::Table(TableOptions opts, Clock clock)
    : m_opts(std::move(opts)),
      m_clock(std::move(clock)),
      m_created_mono(m_clock.mono()),
      m_started_wall(m_opts.started > 0 ? m_opts.started : m_clock.wall()) {
  m_entries.resize(static_cast<std::size_t>(m_opts.ranks < 1 ? 1 : m_opts.ranks));
  for (auto& e : m_entries) {
    e.last_seen = m_created_mono;
  }
  m_log = [](Level level, const std::string& line) {
    if (level == Level::warn) {
      spdlog::warn("{}", line);
    } else {
      spdlog::info("{}", line);
    }
  };
}

std::string Table::label(int rank) const {
  const auto& e = m_entries.at(static_cast<std::size_t>(rank));
  if (e.report) {
    return fmt::format("rank {} {}", rank, node_of(*e.report));
  }
  return fmt::format("rank {}", rank);
}

void Table::change(int rank, State to, const std::string& why) {
  auto& e = m_entries[static_cast<std::size_t>(rank)];
  State from = e.shown;
  e.shown = to;
  m_changed = true;
  auto line = fmt::format("{}: {} -> {}{}", label(rank), k_state_names.text(from), k_state_names.text(to), why);
  bool bad = to == State::unresponsive || to == State::failed;
  m_log(bad ? Level::warn : Level::info, line);
}

bool Table::update(const Report& r) {
  if (r.rank < 0 || r.rank >= static_cast<int>(m_entries.size()) || !valid(r)) {
    return false;
  }
  auto& e = m_entries[static_cast<std::size_t>(r.rank)];
  if (e.report && r.seq < e.report->seq) {
    return false;  // an older report overtaken by a newer one
  }
  double now = m_clock.mono();
  double silence = now - e.last_seen;
  bool first = !e.report;
  State from = e.shown;
  e.report = r;
  e.last_seen = now;
  if (first) {
    e.shown = r.state;
    m_changed = true;
    m_log(Level::info, fmt::format("{}: first report: {}", label(r.rank), k_state_names.text(r.state)));
    return true;
  }
  if (from == r.state) {
    return true;
  }
  std::string why;
  if (from == State::unresponsive) {
    why = fmt::format(" (report after {:.1f} s of silence)", silence);
  }
  if (r.state == State::failed) {
    auto err = last_error_of(r);
    if (!err.empty()) {
      why += ": " + err;
    }
  }
  change(r.rank, r.state, why);
  return true;
}

void Table::age() {
  double now = m_clock.mono();
  double limit = k_unresponsive_intervals * m_opts.interval;
  for (int i = 0; i < static_cast<int>(m_entries.size()); ++i) {
    auto& e = m_entries[static_cast<std::size_t>(i)];
    if (e.shown == State::unresponsive || (e.report && e.report->state == State::stopped)) {
      continue;
    }
    double silent = now - e.last_seen;
    if (silent >= limit) {
      change(i, State::unresponsive,
             e.report ? fmt::format(" (no report for {:.1f} s)", silent)
                      : fmt::format(" (no report at all in {:.1f} s)", silent));
    }
  }
}

bool Table::take_changed() {
  bool c = m_changed;
  m_changed = false;
  return c;
}

Summary Table::summary() const {
  Summary s;
  s.ranks = static_cast<int>(m_entries.size());
  for (const auto& e : m_entries) {
    if (e.shown == State::ready) {
      ++s.ready;
    } else if (e.shown == State::unresponsive) {
      ++s.unresponsive;
    } else {
      ++s.degraded;
    }
    if (e.report) {
      s.slots_busy += e.report->slots_busy;
      s.slots_total += e.report->slots_total;
      s.done += e.report->done;
      s.failed += e.report->failed;
      s.requeued += e.report->requeued;
      s.dead_lettered += e.report->dead_lettered;
      s.duplicates += e.report->duplicates;
    }
  }
  return s;
}

std::vector<int> Table::ranks_not_reporting(State s) const {
  std::vector<int> out;
  for (int i = 0; i < static_cast<int>(m_entries.size()); ++i) {
    const auto& e = m_entries[static_cast<std::size_t>(i)];
    if (!e.report || e.report->state != s) {
      out.push_back(i);
    }
  }
  return out;
}

namespace {

// Each GPU nvidia-smi gave figures for: {"gpu", "used_mib", "total_mib"}.
nlohmann::ordered_json gpu_memory_json(const Report& p) {
  auto out = nlohmann::ordered_json::array();
  auto mem = gpu_memory_of(p);
  std::size_t k = 0;
  for (const auto& slot : gpus_of(p)) {
    for (const auto& id : slot) {
      if (k < mem.size() && mem[k]) {
        out.push_back({{"gpu", id}, {"used_mib", mem[k]->first}, {"total_mib", mem[k]->second}});
      }
      ++k;
    }
  }
  return out;
}

}  // namespace

std::string Table::to_json() const {
  using json = nlohmann::ordered_json;
  double now_mono = m_clock.mono();
  auto s = summary();
  json doc = {
      {"job", m_opts.job},
      {"runtime", m_opts.runtime},
      {"version", k_status_version},
      {"updated", round_to(m_clock.wall(), 0.001)},
      {"started", round_to(m_started_wall, 0.001)},
      {"interval", m_opts.interval},
      {"rank0", {{"host", m_opts.rank0_host}, {"pid", m_opts.rank0_pid}}},
      {"summary",
       {{"ranks", s.ranks},
        {"ready", s.ready},
        {"degraded", s.degraded},
        {"unresponsive", s.unresponsive},
        {"slots_busy", s.slots_busy},
        {"slots_total", s.slots_total},
        {"done", s.done},
        {"failed", s.failed},
        {"requeued", s.requeued},
        {"dead_lettered", s.dead_lettered},
        {"duplicates", s.duplicates}}},
      {"state", k_deployment_state_names.text(m_state)},
  };
  json ranks = json::array();
  for (int i = 0; i < static_cast<int>(m_entries.size()); ++i) {
    const auto& e = m_entries[static_cast<std::size_t>(i)];
    // Before its first report a rank has zeros, "" and nulls: same keys always.
    Report none{};
    const Report& p = e.report ? *e.report : none;
    json r;
    r["rank"] = i;
    r["node"] = node_of(p);
    r["pid"] = p.pid;
    r["state"] = k_state_names.text(e.shown);
    r["reported_state"] = e.report ? json(k_state_names.text(p.state)) : json(nullptr);
    r["slots_busy"] = p.slots_busy;
    r["slots_total"] = p.slots_total;
    r["done"] = p.done;
    r["failed"] = p.failed;
    r["requeued"] = p.requeued;
    r["dead_lettered"] = p.dead_lettered;
    r["duplicates"] = p.duplicates;
    r["broker"] = p.broker_connected != 0;
    r["consuming"] = p.consuming != 0;
    r["blocked"] = p.broker_blocked != 0;
    r["instance"] = p.instance_alive != 0;
    r["restarts"] = p.restarts;
    r["rss_kb"] = p.rss_kb;
    r["rss_tree_kb"] = p.rss_tree_kb;
    r["uptime"] = round_to(p.uptime, 0.1);
    r["seq"] = p.seq;
    r["last_seen"] = e.report ? json(round_to(now_mono - e.last_seen, 0.1)) : json(nullptr);
    r["last_error"] = last_error_of(p);
    r["gpus"] = gpus_of(p);          // slot k's devices; [] for a CPU runtime
    r["gpus_out"] = gpus_out_of(p);  // slots out of service (indices into gpus)
    r["gpus_out_why"] = gpus_out_why_of(p);
    r["gpu_memory"] = gpu_memory_json(p);
    ranks.push_back(std::move(r));
  }
  doc["ranks"] = std::move(ranks);
  // A node name or error from a misbehaving rank may not be valid UTF-8:
  // replace rather than throw.
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace lhpc::health
