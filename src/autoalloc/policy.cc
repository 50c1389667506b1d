#include "autoalloc/policy.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace lhpc::autoalloc {

Supply supply_of(const Snapshot& s) {
  Supply sp;
  int learned_slots = 0, learned_nodes = 0;
  for (const auto& j : s.jobs) {
    if (j.phase == Phase::ended) {
      continue;
    }
    sp.held_nodes += j.nodes;
    sp.busy_slots += j.slots_busy;
    if (j.phase == Phase::pending) {
      ++sp.pending_jobs;
    }
    if (j.phase == Phase::pending || j.phase == Phase::starting) {
      sp.coming_nodes += j.nodes;
    }
    if (j.phase == Phase::serving) {
      sp.serving_nodes += j.nodes;
      sp.free_slots += std::max(0, j.slots_total - j.slots_busy);
      if (j.ready_ranks > 0 && j.slots_total > 0) {
        learned_slots += j.slots_total;
        learned_nodes += j.ready_ranks;
      }
    }
  }
  if (learned_nodes > 0) {
    sp.slots_per_node = std::max(1, learned_slots / learned_nodes);
  } else if (s.learned_slots_per_node > 0) {
    sp.slots_per_node = s.learned_slots_per_node;
  } else {
    sp.slots_per_node = std::max(1, s.default_slots_per_node);
  }
  return sp;
}

double backoff_delay(int refused_in_row, const Limits& l) {
  if (refused_in_row <= 0) {
    return 0;
  }
  double d = l.backoff_first * std::pow(2.0, std::min(refused_in_row - 1, 30));
  return std::min(d, l.backoff_cap);
}

bool on_served(StartFailures& f) {
  bool lifted = f.halted;
  f = StartFailures{};
  return lifted;
}

bool on_start_failure(StartFailures& f, const std::string& out, double now, const Limits& l) {
  ++f.in_row;
  f.outputs.push_back(out);
  if (f.halted || f.in_row < l.max_start_failures) {
    return false;
  }
  f.halted = true;
  f.halted_at = now;
  return true;
}

bool cool_off(StartFailures& f, double now, const Limits& l) {
  if (!f.halted || now - f.halted_at < l.halt_cooloff) {
    return false;
  }
  f.halted = false;
  f.in_row = std::max(0, l.max_start_failures - 1);
  return true;
}

double observe_idle(IdleClock& c, double now, int busy, unsigned long long done) {
  if (!c.started || busy > 0 || done != c.done) {
    c.since = now;
    c.done = done;
    c.started = true;
  }
  return std::max(0.0, now - c.since);
}

namespace {

// Empty when a submission of `nodes` may go out now; else why not.
std::string submit_blocked(const Snapshot& s, const Limits& l, const Supply& sp, int nodes) {
  if (!s.submitting) {
    return "not submitting: the controller is ending";
  }
  if (s.halted) {
    return fmt::format("not submitting: {} jobs in a row failed at start", l.max_start_failures);
  }
  if (s.now < s.backoff_until) {
    return fmt::format("backing off after a refused submission: next try in {:.0f} s", s.backoff_until - s.now);
  }
  if (sp.held_nodes + nodes > l.max_nodes) {
    return fmt::format("at the node limit: {} held + {} > --max-nodes {}", sp.held_nodes, nodes, l.max_nodes);
  }
  if (sp.pending_jobs >= l.max_pending) {
    return fmt::format("{} job(s) pending in Slurm's queue (--max-pending {})", sp.pending_jobs, l.max_pending);
  }
  return {};
}

bool queue_empty(const Snapshot& s) { return s.ready && *s.ready == 0; }

// Idle serving jobs drain through the stop path; pending jobs nobody needs are cancelled.
void retire_idle(const Snapshot& s, const Limits& l, Supply& sp, Decision& d) {
  if (!queue_empty(s)) {
    return;  // work waiting, or the broker could not be asked: keep everything
  }
  for (const auto& j : s.jobs) {
    if (j.stop_requested || sp.held_nodes - j.nodes < l.min_nodes) {
      continue;
    }
    if (j.phase == Phase::serving && j.slots_busy == 0 && j.idle_for >= l.idle_timeout) {
      d.actions.push_back(
          {ActionKind::retire, j.id, j.nodes,
           fmt::format("job {} idle for {:.0f} s (--idle-timeout {:g})", j.id, j.idle_for, l.idle_timeout)});
      sp.held_nodes -= j.nodes;
    } else if (j.phase == Phase::pending && s.demand_idle_for >= l.idle_timeout) {
      d.actions.push_back(
          {ActionKind::cancel, j.id, j.nodes,
           fmt::format("job {} still pending and the queue has been empty for {:.0f} s", j.id, s.demand_idle_for)});
      sp.held_nodes -= j.nodes;
      sp.pending_jobs -= 1;
    }
  }
}

// A serving job close to its limit while work remains: its successor, once.
std::optional<Action> renewal(const Snapshot& s, const Limits& l) {
  for (const auto& j : s.jobs) {
    if (j.phase != Phase::serving || j.renewed || j.stop_requested || !j.seconds_left ||
        *j.seconds_left > l.renew_before) {
      continue;
    }
    bool work = (s.ready && *s.ready > 0) || j.slots_busy > 0;
    if (work) {
      return Action{ActionKind::submit, j.id, l.nodes_per_job,
                    fmt::format("renew job {}: {:.0f} s to its time limit with work left", j.id, *j.seconds_left)};
    }
  }
  return std::nullopt;
}

std::optional<Action> for_demand(const Snapshot& s, const Limits& l, const Supply& sp) {
  if (sp.held_nodes < l.min_nodes) {
    return Action{ActionKind::submit,
                  {},
                  l.nodes_per_job,
                  fmt::format("{} node(s) held, --min-nodes {}", sp.held_nodes, l.min_nodes)};
  }
  if (!s.ready || *s.ready == 0) {
    return std::nullopt;
  }
  long capacity = sp.free_slots + static_cast<long>(sp.coming_nodes) * sp.slots_per_node;
  if (static_cast<long>(*s.ready) <= capacity) {
    return std::nullopt;
  }
  return Action{ActionKind::submit,
                {},
                l.nodes_per_job,
                fmt::format("{} task(s) ready, capacity free or coming: {} slot(s)", *s.ready, capacity)};
}

std::string quiet_reason(const Snapshot& s, const Supply& sp) {
  if (!s.ready) {
    return "waiting: the broker could not be asked for the queue";
  }
  if (*s.ready == 0 && sp.held_nodes == 0) {
    return "idle: queue empty, no deployment (scaled to zero)";
  }
  if (*s.ready == 0) {
    return fmt::format("watching: queue empty, {} node(s) held until idle", sp.held_nodes);
  }
  return fmt::format("watching: {} task(s) ready, covered by {} free and {} coming node(s)", *s.ready, sp.free_slots,
                     sp.coming_nodes);
}

}  // namespace

Decision decide(const Snapshot& s, const Limits& l) {
  Decision d;
  Supply sp = supply_of(s);
  retire_idle(s, l, sp, d);
  auto want = renewal(s, l);
  if (!want) {
    want = for_demand(s, l, sp);
  }
  if (!want) {
    d.next = d.actions.empty() ? quiet_reason(s, sp) : d.actions.back().why;
    return d;
  }
  auto blocked = submit_blocked(s, l, sp, want->nodes);
  if (blocked.empty()) {
    d.next = "submit: " + want->why;
    d.actions.push_back(std::move(*want));
  } else {
    d.next = blocked + " (wanted: " + want->why + ")";
  }
  return d;
}

}  // namespace lhpc::autoalloc

namespace lhpc::autoalloc {

namespace {
std::optional<std::vector<long>> numbers(const std::string& text) {
  std::vector<long> out;
  std::size_t i = 0;
  while (i <= text.size()) {
    auto colon = text.find(':', i);
    auto part = text.substr(i, colon == std::string::npos ? std::string::npos : colon - i);
    if (part.empty() || part.size() > 9 || part.find_first_not_of("0123456789") != std::string::npos) {
      return std::nullopt;
    }
    out.push_back(std::stol(part));
    if (colon == std::string::npos) {
      break;
    }
    i = colon + 1;
  }
  return out;
}
}  // namespace

std::optional<double> parse_slurm_time(const std::string& text) {
  long days = 0;
  std::string rest = text;
  auto dash = text.find('-');
  if (dash != std::string::npos) {
    auto d = numbers(text.substr(0, dash));
    if (!d || d->size() != 1) {
      return std::nullopt;
    }
    days = (*d)[0];
    rest = text.substr(dash + 1);
  }
  auto n = numbers(rest);
  if (!n || n->size() > 3) {
    return std::nullopt;
  }
  const auto& v = *n;
  long secs = 0;
  if (dash != std::string::npos) {  // D-H, D-H:M, D-H:M:S
    secs = v[0] * 3600 + (v.size() > 1 ? v[1] * 60 : 0) + (v.size() > 2 ? v[2] : 0);
  } else if (v.size() == 1) {  // M
    secs = v[0] * 60;
  } else if (v.size() == 2) {  // M:S
    secs = v[0] * 60 + v[1];
  } else {  // H:M:S
    secs = v[0] * 3600 + v[1] * 60 + v[2];
  }
  return static_cast<double>(days * 86400 + secs);
}

}  // namespace lhpc::autoalloc
