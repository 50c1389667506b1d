#include "dispatch/protocol.h"

#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cstdio>

#include "util/json_number.h"
#include "util/strings.h"

namespace lhpc::dispatch {

namespace {

constexpr char k_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

constexpr std::array<signed char, 256> make_b64_table() {
  std::array<signed char, 256> t{};
  for (auto& v : t) {
    v = -1;
  }
  for (int i = 0; i < 64; ++i) {
    t[static_cast<unsigned char>(k_b64[i])] = static_cast<signed char>(i);
  }
  return t;
}
constexpr auto k_b64_table = make_b64_table();

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\v' || c == '\f'; }

std::string shorten(std::string s, std::size_t max = 120) {
  if (s.size() > max) {
    s.resize(max);
    s += "...";
  }
  return s;
}

}  // namespace

std::string base64_encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(in[k]); };
  for (; i + 3 <= in.size(); i += 3) {
    unsigned v = (byte(i) << 16) | (byte(i + 1) << 8) | byte(i + 2);
    out += k_b64[(v >> 18) & 63];
    out += k_b64[(v >> 12) & 63];
    out += k_b64[(v >> 6) & 63];
    out += k_b64[v & 63];
  }
  std::size_t rest = in.size() - i;
  if (rest == 1) {
    unsigned v = byte(i) << 16;
    out += k_b64[(v >> 18) & 63];
    out += k_b64[(v >> 12) & 63];
    out += "==";
  } else if (rest == 2) {
    unsigned v = (byte(i) << 16) | (byte(i + 1) << 8);
    out += k_b64[(v >> 18) & 63];
    out += k_b64[(v >> 12) & 63];
    out += k_b64[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::optional<std::string> base64_decode(std::string_view text) {
  std::string clean;
  clean.reserve(text.size());
  for (char c : text) {
    if (!is_space(c)) {
      clean += c;
    }
  }
  if (clean.size() % 4 != 0) {
    return std::nullopt;
  }
  std::string out;
  out.reserve(clean.size() / 4 * 3);
  for (std::size_t i = 0; i < clean.size(); i += 4) {
    int pad = 0;
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = clean[i + k];
      if (c == '=') {
        // Padding only in the last quantum, only in its last two places,
        // and nothing but padding after it.
        if (i + 4 != clean.size() || k < 2) {
          return std::nullopt;
        }
        ++pad;
        v <<= 6;
        continue;
      }
      if (pad > 0) {
        return std::nullopt;
      }
      int d = k_b64_table[static_cast<unsigned char>(c)];
      if (d < 0) {
        return std::nullopt;
      }
      v = (v << 6) | static_cast<unsigned>(d);
    }
    out += static_cast<char>((v >> 16) & 0xff);
    if (pad < 2) {
      out += static_cast<char>((v >> 8) & 0xff);
    }
    if (pad < 1) {
      out += static_cast<char>(v & 0xff);
    }
  }
  return out;
}

bool nests_deeper_than(std::string_view json, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < json.size(); ++i) {
    char c = json[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // whatever is escaped cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        return true;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

namespace {

std::optional<Malformed> over_limits(std::string_view text, const Limits& limits, const char* what) {
  if (text.size() > limits.max_bytes) {
    return Malformed{std::string(what) + " of " + std::to_string(text.size()) + " bytes is over max_message_bytes (" +
                     std::to_string(limits.max_bytes) + ")"};
  }
  if (nests_deeper_than(text, limits.max_depth)) {
    return Malformed{std::string(what) + " nests deeper than max_message_depth (" + std::to_string(limits.max_depth) +
                     ")"};
  }
  return std::nullopt;
}

std::optional<Malformed> check_calls(const Json& payload) {
  auto ids = payload.find("call_ids");
  if (ids == payload.end() || !ids->is_array()) {
    return Malformed{"send_task payload has no call_ids list"};
  }
  if (ids->empty()) {
    return Malformed{"send_task payload has no calls (call_ids is empty)"};
  }
  auto ranges = payload.find("data_byte_ranges");
  if (ranges == payload.end() || !ranges->is_array()) {
    return Malformed{"send_task payload has no data_byte_ranges list"};
  }
  if (ranges->size() != ids->size()) {
    return Malformed{"call_ids (" + std::to_string(ids->size()) + ") and data_byte_ranges (" +
                     std::to_string(ranges->size()) + ") differ in length"};
  }
  if (auto tc = payload.find("total_calls"); tc != payload.end()) {
    auto total = json_integer<long long>(*tc);
    if (!total) {
      return Malformed{"total_calls " + json_integer_rule<long long>()};
    }
    if (*total != static_cast<long long>(ids->size())) {
      return Malformed{"total_calls (" + std::to_string(*total) + ") differs from the number of call_ids (" +
                       std::to_string(ids->size()) + ")"};
    }
  }
  return std::nullopt;
}

}  // namespace

std::variant<Task, Malformed> decode_payload(Action action, std::string_view payload_json, const Limits& limits) {
  if (auto bad = over_limits(payload_json, limits, "payload")) {
    return *bad;
  }
  Task t;
  t.action = action;
  t.payload = Json::parse(payload_json.begin(), payload_json.end(), nullptr, /*allow_exceptions=*/false);
  if (t.payload.is_discarded()) {
    return Malformed{"payload is not JSON"};
  }
  if (!t.payload.is_object()) {
    return Malformed{"payload is not a JSON object"};
  }
  if (t.action != Action::send_task) {
    return t;
  }
  if (auto bad = check_calls(t.payload)) {
    return *bad;
  }
  t.calls = t.payload.find("call_ids")->size();
  return t;
}

std::variant<Task, Malformed> decode(std::string_view body, const Limits& limits) {
  if (auto bad = over_limits(body, limits, "message")) {
    return *bad;
  }
  Json msg = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (msg.is_discarded()) {
    return Malformed{"body is not JSON"};
  }
  if (!msg.is_object()) {
    return Malformed{"body is not a JSON object"};
  }
  auto a = msg.find("action");
  if (a == msg.end()) {
    return Malformed{"no action"};
  }
  if (!a->is_string()) {
    return Malformed{"action is not a string"};
  }
  auto action = k_action_names.parse(a->get_ref<const std::string&>());
  if (!action) {
    return Malformed{"unknown action '" + escape_controls(shorten(a->get<std::string>())) + "'"};
  }
  auto p = msg.find("payload");
  if (p == msg.end()) {
    return Malformed{"no payload"};
  }
  if (!p->is_string()) {
    return Malformed{"payload is not a base64 string"};
  }
  auto raw = base64_decode(p->get_ref<const std::string&>());
  if (!raw) {
    return Malformed{"payload is not valid base64"};
  }
  return decode_payload(*action, *raw, limits);
}

std::string encode(Action action, const Json& payload) { return encode_text(action, payload.dump()); }

std::string encode_text(Action action, std::string_view payload_json) {
  // Action names and base64 need no JSON escaping.
  return "{\"action\":\"" + std::string(k_action_names.text(action)) + "\",\"payload\":\"" +
         base64_encode(payload_json) + "\"}";
}

Calls::Calls(Json&& payload) {
  for (auto it = payload.begin(); it != payload.end(); ++it) {
    const std::string& k = it.key();
    if (k == "call_ids" || k == "data_byte_ranges" || k == "total_calls") {
      continue;
    }
    if (k == "worker_processes") {
      m_worker_processes = it.value().dump();
      continue;
    }
    if (k == "job_key" && it.value().is_string()) {
      m_job_key = it.value().get<std::string>();
    }
    m_shared += Json(k).dump();
    m_shared += ':';
    m_shared += it.value().dump();
    m_shared += ',';
  }
  auto texts = [](const Json& list) {
    std::vector<std::string> out;
    out.reserve(list.size());
    for (const auto& e : list) {
      out.push_back(e.dump());
    }
    return out;
  };
  m_ids = texts(payload.at("call_ids"));
  m_ranges = texts(payload.at("data_byte_ranges"));
}

std::string Calls::slice(std::size_t from, std::size_t to, bool one_call) const {
  auto list = [&](const std::vector<std::string>& v) {
    std::string s = "[";
    for (std::size_t i = from; i < to; ++i) {
      if (i > from) {
        s += ',';
      }
      s += v[i];
    }
    return s + "]";
  };
  std::string out = "{" + m_shared;
  out += "\"call_ids\":" + list(m_ids);
  out += ",\"data_byte_ranges\":" + list(m_ranges);
  out += ",\"total_calls\":" + std::to_string(to - from);
  if (one_call) {
    out += ",\"worker_processes\":1";
  } else if (!m_worker_processes.empty()) {
    out += ",\"worker_processes\":" + m_worker_processes;
  }
  return out + "}";
}

std::string Calls::describe(std::size_t from, std::size_t to) const {
  auto id_text = [](const std::string& j) {
    return j.size() >= 2 && j.front() == '"' && j.back() == '"' ? j.substr(1, j.size() - 2) : j;
  };
  if (from >= to || to > m_ids.size()) {
    return bounded_for_log(m_job_key, k_logged_id_bytes);
  }
  std::string out = m_job_key + "/" + id_text(m_ids[from]);
  if (to - from > 1) {
    out += ".." + id_text(m_ids[to - 1]) + " (" + std::to_string(to - from) + " calls)";
  }
  return bounded_for_log(out, k_logged_id_bytes);
}

std::string describe_calls(const Json& payload) {
  std::string job = "?";
  if (auto jk = payload.find("job_key"); jk != payload.end() && jk->is_string()) {
    job = jk->get<std::string>();
  }
  auto ids = payload.find("call_ids");
  if (ids == payload.end() || !ids->is_array() || ids->empty()) {
    return bounded_for_log(job, k_logged_id_bytes);
  }
  auto id_text = [](const Json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); };
  std::string out = job + "/" + id_text(ids->front());
  if (ids->size() > 1) {
    out += ".." + id_text(ids->back()) + " (" + std::to_string(ids->size()) + " calls)";
  }
  return bounded_for_log(out, k_logged_id_bytes);
}

int prefetch_for(int free_slots, int held_messages) {
  int n = std::max(0, free_slots) + std::max(0, held_messages) + k_reserve;
  // basic.qos takes a 16-bit count; 0 would mean "unlimited".
  return n > 65535 ? 65535 : n;
}

std::string rank_queue(const std::string& queue, const std::string& job, int rank) {
  return queue + ".rank." + job + "." + std::to_string(rank);
}

std::string body_id(std::string_view body) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "body-%016llx",
                static_cast<unsigned long long>(XXH3_64bits(body.data(), body.size())));
  return buf;
}

std::string json_string(const Json& j, const char* key, const std::string& fallback) {
  if (!j.is_object()) {
    return fallback;
  }
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

long long json_int(const Json& j, const char* key, long long fallback) {
  if (!j.is_object()) {
    return fallback;
  }
  auto it = j.find(key);
  return it != j.end() ? json_integer<long long>(*it).value_or(fallback) : fallback;
}

bool json_bool(const Json& j, const char* key, bool fallback) {
  if (!j.is_object()) {
    return fallback;
  }
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

Json ping_reply(int rank, const std::string& node, const Json& echo) {
  return {{"rank", rank}, {"node", node}, {"echo", echo}};
}

}  // namespace lhpc::dispatch
