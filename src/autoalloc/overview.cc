#include "autoalloc/overview.h"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "autoalloc/controller.h"
#include "autoalloc/state_reader.h"
#include "util/error.h"
#include "util/fs.h"

namespace lhpc::autoalloc {

std::vector<Deployment> deployments(double now) {
  std::vector<Deployment> out;
  for (const auto& loc : health::job_locations()) {
    try {
      auto look = health::find_deployment(loc.job);
      if (!look.found) {
        continue;
      }
      Deployment dep{*look.found, health::parse_status(look.found->text, look.found->loc.link), {}};
      dep.assessment = health::assess(dep.view, now);
      out.push_back(std::move(dep));
    } catch (const Error&) {
      continue;  // not a deployment of ours, or a file being rewritten
    }
  }
  std::sort(out.begin(), out.end(),
            [](const Deployment& a, const Deployment& b) { return a.view.started < b.view.started; });
  return out;
}

namespace {
bool live(const Deployment& d) { return !health::ended(d.view.state) && !d.assessment.stale; }

// What `status` lists: every live deployment and those that ended recently.
std::vector<Deployment> shown(std::vector<Deployment> all, double now, bool everything, std::size_t& hidden) {
  auto before = all.size();
  if (!everything) {
    std::erase_if(all, [now](const Deployment& d) { return !live(d) && now - d.view.updated > k_recent_seconds; });
  }
  hidden = before - all.size();
  return all;
}
}  // namespace

std::vector<Deployment> live_deployments(double now) {
  auto all = deployments(now);
  std::erase_if(all, [](const Deployment& d) { return !live(d); });
  return all;
}

Overview overview_text(double now, bool everything) {
  std::size_t hidden = 0;
  auto all = shown(deployments(now), now, everything, hidden);
  auto state = load_state();
  Overview o;
  for (const auto& d : all) {
    o.text += d.assessment.headline + "\n";
    if (live(d) && d.assessment.code != Exit::ok) {
      o.code = Exit::failure;
    }
  }
  if (state) {
    o.text += status_line(*state, now) + "\n";
    if (!state->error.empty()) {
      o.code = Exit::failure;
    }
  }
  if (hidden > 0) {
    o.text += fmt::format("{} deployment{} that ended over an hour ago not shown (status --all)\n", hidden,
                          hidden == 1 ? "" : "s");
  }
  if (all.empty() && !state) {
    o.code = Exit::no_deployment;
  }
  return o;
}

Overview overview_json(double now, bool everything) {
  Overview o{.text = {}, .code = overview_text(now, everything).code};
  nlohmann::ordered_json j;
  j["deployments"] = nlohmann::ordered_json::array();
  std::size_t hidden = 0;
  for (const auto& d : shown(deployments(now), now, everything, hidden)) {
    j["deployments"].push_back(nlohmann::ordered_json::parse(d.found.text));
  }
  j["hidden"] = hidden;
  auto text = read_state_text();
  j["autoalloc"] = text ? nlohmann::ordered_json::parse(*text, nullptr, false) : nlohmann::ordered_json(nullptr);
  o.text = j.dump() + "\n";
  return o;
}

}  // namespace lhpc::autoalloc
