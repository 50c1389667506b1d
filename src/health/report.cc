#include "health/report.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "config/config.h"
#include "util/error.h"
#include "util/strings.h"

namespace lhpc::health {

namespace {

// Largest prefix of `s` of at most `max` bytes that does not split a UTF-8 sequence.
std::size_t utf8_cut(std::string_view s, std::size_t max) {
  if (s.size() <= max) {
    return s.size();
  }
  std::size_t cut = max;
  // s[cut] is the first byte left out: a continuation byte there means the
  // sequence it belongs to started inside the prefix; leave that one out too.
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) {
    --cut;
  }
  return cut;
}

void copy_field(char* dst, std::size_t cap, std::string_view text) {
  std::memset(dst, 0, cap);
  auto n = utf8_cut(text, cap - 1);
  std::memcpy(dst, text.data(), n);
}

bool url_end(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == '"' || c == '\'' ||
         c == '`' || c == '<' || c == '>' || c == ',' || c == ';' || c == ')' || c == ']';
}

// A URL that config::parse_amqp_url rejects (say a raw '/' or '@' in the
// password) may still hold a password: hide everything between the first ':'
// after the scheme and the last '@', over-redacting rather than leaking.
std::string redact_malformed(std::string_view url, std::size_t authority_start) {
  auto at = url.rfind('@');
  if (at == std::string_view::npos || at < authority_start) {
    return std::string(url);
  }
  auto colon = url.find(':', authority_start);
  if (colon == std::string_view::npos || colon > at) {
    return std::string(url);  // a user name only
  }
  return std::string(url.substr(0, colon + 1)) + "***" + std::string(url.substr(at));
}

std::string redact_one(std::string_view url, std::size_t authority_start) {
  try {
    config::parse_amqp_url(std::string(url));
  } catch (const Error&) {
    return redact_malformed(url, authority_start);
  }
  return config::redact_url(std::string(url));
}

bool iequals_at(std::string_view s, std::size_t pos, std::string_view word) {
  if (pos + word.size() > s.size()) {
    return false;
  }
  for (std::size_t i = 0; i < word.size(); ++i) {
    char c = s[pos + i];
    if (c >= 'A' && c <= 'Z') {
      c = static_cast<char>(c - 'A' + 'a');
    }
    if (c != word[i]) {
      return false;
    }
  }
  return true;
}

}  // namespace

std::string redact_secrets(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t scheme_len = 0;
    if (iequals_at(text, i, "amqps://")) {
      scheme_len = 8;
    } else if (iequals_at(text, i, "amqp://")) {
      scheme_len = 7;
    }
    if (scheme_len == 0) {
      out += text[i++];
      continue;
    }
    auto end = i + scheme_len;
    while (end < text.size() && !url_end(text[end])) {
      ++end;
    }
    out += redact_one(text.substr(i, end - i), scheme_len);
    i = end;
  }
  return out;
}

std::string truncate_utf8(std::string_view s, std::size_t max_bytes) {
  if (s.size() <= max_bytes) {
    return std::string(s);
  }
  if (max_bytes < 3) {
    return std::string(s.substr(0, utf8_cut(s, max_bytes)));
  }
  return std::string(s.substr(0, utf8_cut(s, max_bytes - 3))) + "...";
}

void set_node(Report& r, std::string_view node) { copy_field(r.node, sizeof r.node, node); }

namespace {

// Redact before cutting: a cut must never leave half a password behind a
// URL that redaction would no longer recognise.
void set_text(char* field, std::size_t size, std::string_view text) {
  auto clean = redact_secrets(text);
  for (auto& c : clean) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      c = ' ';
    }
  }
  copy_field(field, size, truncate_utf8(clean, size - 1));
}

}  // namespace

void set_last_error(Report& r, std::string_view text) { set_text(r.last_error, sizeof r.last_error, text); }

void set_gpus_out(Report& r, const std::map<int, std::string>& out) {
  r.gpus_out = 0;
  std::string why;
  for (const auto& [slot, text] : out) {
    if (slot < 0 || slot > 63) {
      continue;
    }
    r.gpus_out |= std::uint64_t{1} << slot;
    why += (why.empty() ? "" : "; ") + std::string("slot ") + std::to_string(slot) + ": " + text;
  }
  set_text(r.gpus_out_why, sizeof r.gpus_out_why, why);
}

std::vector<int> gpus_out_of(const Report& r) {
  std::vector<int> slots;
  for (int k = 0; k < 64; ++k) {
    if (r.gpus_out & (std::uint64_t{1} << k)) {
      slots.push_back(k);
    }
  }
  return slots;
}

void set_gpu_memory(Report& r, const std::vector<GpuMemory>& per_device) {
  std::string text;
  bool any = false;
  for (const auto& m : per_device) {
    std::string one = (text.empty() ? "" : ";") + (m ? fmt::format("{}/{}", m->first, m->second) : "-");
    if (text.size() + one.size() > sizeof r.gpu_memory - 1) {
      break;
    }
    any = any || m.has_value();
    text += one;
  }
  copy_field(r.gpu_memory, sizeof r.gpu_memory, any ? text : "");
}

std::vector<GpuMemory> gpu_memory_of(const Report& r) {
  std::vector<GpuMemory> out;
  std::string text(r.gpu_memory, ::strnlen(r.gpu_memory, sizeof r.gpu_memory));
  if (text.empty()) {
    return out;
  }
  for (const auto& one : split(text, ';')) {
    auto slash = one.find('/');
    GpuMemory m;
    if (slash != std::string::npos) {
      std::uint64_t used = 0, total = 0;
      auto a = std::from_chars(one.data(), one.data() + slash, used);
      auto b = std::from_chars(one.data() + slash + 1, one.data() + one.size(), total);
      if (a.ec == std::errc() && a.ptr == one.data() + slash && b.ec == std::errc() &&
          b.ptr == one.data() + one.size()) {
        m = std::make_pair(used, total);
      }
    }
    out.push_back(m);
  }
  return out;
}

std::string gpus_out_why_of(const Report& r) {
  return std::string(r.gpus_out_why, ::strnlen(r.gpus_out_why, sizeof r.gpus_out_why));
}

std::string node_of(const Report& r) { return std::string(r.node, ::strnlen(r.node, sizeof r.node)); }

std::string last_error_of(const Report& r) {
  return std::string(r.last_error, ::strnlen(r.last_error, sizeof r.last_error));
}

void set_gpus(Report& r, const std::vector<std::vector<std::string>>& slots) {
  std::string text;
  for (const auto& slot : slots) {
    std::string one = (text.empty() ? "" : ";") + join(slot, ",");
    if (text.size() + one.size() > sizeof r.gpus - 1) {
      break;
    }
    text += one;
  }
  std::memset(r.gpus, 0, sizeof r.gpus);
  std::memcpy(r.gpus, text.data(), text.size());
}

std::vector<std::vector<std::string>> gpus_of(const Report& r) {
  std::vector<std::vector<std::string>> slots;
  std::string text(r.gpus, ::strnlen(r.gpus, sizeof r.gpus));
  if (text.empty()) {
    return slots;
  }
  for (const auto& slot : split(text, ';')) {
    slots.push_back(split(slot, ','));
  }
  return slots;
}

bool valid(const Report& r) {
  auto s = static_cast<std::uint8_t>(r.state);  // unresponsive is rank 0's verdict, never sent
  return r.version == k_report_version && r.rank >= 0 && (s <= 5 || r.state == State::reconnecting);
}

double unix_now() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

}  // namespace lhpc::health
