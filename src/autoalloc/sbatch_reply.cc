#include "autoalloc/sbatch_reply.h"

#include <cstdint>

#include "health/report.h"

namespace lhpc::autoalloc {

namespace {

bool digit(char c) { return c >= '0' && c <= '9'; }

bool job_id(std::string_view s) {
  if (s.empty() || s.size() > 10 || s[0] == '0') {
    return false;
  }
  std::uint64_t v = 0;
  for (char c : s) {
    if (!digit(c)) {
      return false;
    }
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return v <= UINT32_MAX;
}

bool cluster_name(std::string_view s) {
  if (s.empty() || s.size() > 64) {
    return false;
  }
  for (char c : s) {
    bool ok = digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '.' || c == '_' || c == '-';
    if (!ok) {
      return false;
    }
  }
  return true;
}

// `JOBID` or `JOBID;CLUSTER`, already trimmed.
bool read_line(std::string_view line, SbatchReply& r) {
  auto semi = line.find(';');
  auto id = line.substr(0, semi);
  auto cluster = semi == std::string_view::npos ? std::string_view() : line.substr(semi + 1);
  if (!job_id(id) || (semi != std::string_view::npos && !cluster_name(cluster))) {
    return false;
  }
  r.job = std::string(id);
  r.cluster = std::string(cluster);
  return true;
}

std::string_view trimmed(std::string_view s) {
  auto blank = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
  while (!s.empty() && blank(s.front())) {
    s.remove_prefix(1);
  }
  while (!s.empty() && blank(s.back())) {
    s.remove_suffix(1);
  }
  return s;
}

// sbatch's words for a message: on one line, no terminal control, no
// password, ASCII (the state file is JSON, which wants valid UTF-8; Slurm
// writes English). The whole message is bounded by parse_sbatch_reply.
std::string shown(std::string_view text) {
  auto clean = health::redact_secrets(trimmed(text));
  for (auto& c : clean) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      c = ' ';
    } else if (u >= 0x80) {
      c = '?';
    }
  }
  return std::string(trimmed(clean));
}

}  // namespace

SbatchReply parse_sbatch_reply(int exit_code, std::string_view out, std::string_view err) {
  SbatchReply r;
  if (exit_code == 0) {
    // From the end: the reply is sbatch's last word; a wrapper's banner
    // comes before it, or a notice after it.
    std::size_t end = out.size();
    while (end > 0) {
      auto start = out.rfind('\n', end - 1);
      start = start == std::string_view::npos ? 0 : start + 1;
      auto line = trimmed(out.substr(start, end - start));
      if (!line.empty() && read_line(line, r)) {
        return r;
      }
      end = start == 0 ? 0 : start - 1;
    }
    r.unreadable_success = true;
  }
  auto o = shown(out), e = shown(err);
  std::string said;
  if (exit_code == 0) {
    said = o.empty() && e.empty() ? "sbatch exited with code 0 and printed nothing"
                                  : "sbatch printed no job id: " + (o.empty() ? e : o);
  } else if (!e.empty()) {
    said = e;
  } else {
    said = "sbatch exited with code " + std::to_string(exit_code) + (o.empty() ? "" : ": " + o);
  }
  r.refusal = health::truncate_utf8(said, k_reply_shown);
  return r;
}

}  // namespace lhpc::autoalloc
