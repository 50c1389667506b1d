#include "dispatch/runtime.h"

#include <array>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "config/config.h"

namespace lhpc::dispatch {

namespace {

constexpr std::string_view k_job_name_prefix = "lithops-worker-";
constexpr std::size_t k_job_name_hash = 10;
constexpr int k_metadata_memory = 128;  // what _generate_runtime_meta passes
// A version without its dots longer than this is not tried dot by dot
// (2^(n-1) placements); Lithops' are about 7 ("371dev0").
constexpr std::size_t k_max_version_digits = 14;

std::uint32_t rotl(std::uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

void sha1_block(std::array<std::uint32_t, 5>& h, const unsigned char* p) {
  std::uint32_t w[80];
  for (int i = 0; i < 16; ++i) {
    w[i] = (std::uint32_t(p[4 * i]) << 24) | (std::uint32_t(p[4 * i + 1]) << 16) | (std::uint32_t(p[4 * i + 2]) << 8) |
           std::uint32_t(p[4 * i + 3]);
  }
  for (int i = 16; i < 80; ++i) {
    w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
  }
  std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  for (int i = 0; i < 80; ++i) {
    std::uint32_t f = 0, k = 0;
    if (i < 20) {
      f = (b & c) | (~b & d);
      k = 0x5A827999;
    } else if (i < 40) {
      f = b ^ c ^ d;
      k = 0x6ED9EBA1;
    } else if (i < 60) {
      f = (b & c) | (b & d) | (c & d);
      k = 0x8F1BBCDC;
    } else {
      f = b ^ c ^ d;
      k = 0xCA62C1D6;
    }
    std::uint32_t t = rotl(a, 5) + f + e + k + w[i];
    e = d;
    d = c;
    c = rotl(b, 30);
    b = a;
    a = t;
  }
  h[0] += a;
  h[1] += b;
  h[2] += c;
  h[3] += d;
  h[4] += e;
}

bool all_digits(std::string_view s) {
  if (s.empty()) {
    return false;
  }
  for (char c : s) {
    if (c < '0' || c > '9') {
      return false;
    }
  }
  return true;
}

// Every version whose dotless form is `digits`: a dot or none in each gap.
template <class F>
bool any_dotted(std::string_view digits, F&& match) {
  if (digits.empty() || digits.size() > k_max_version_digits) {
    return false;
  }
  const std::size_t gaps = digits.size() - 1;
  std::string v;
  for (std::uint32_t mask = 0; mask < (1u << gaps); ++mask) {
    v.clear();
    for (std::size_t i = 0; i < digits.size(); ++i) {
      v += digits[i];
      if (i < gaps && (mask >> i) & 1u) {
        v += '.';
      }
    }
    if (match(v)) {
      return true;
    }
  }
  return false;
}

}  // namespace

std::string sha1_hex(std::string_view bytes) {
  std::array<std::uint32_t, 5> h{0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
  std::vector<unsigned char> msg(bytes.begin(), bytes.end());
  const std::uint64_t bits = static_cast<std::uint64_t>(bytes.size()) * 8;
  msg.push_back(0x80);
  while (msg.size() % 64 != 56) {
    msg.push_back(0);
  }
  for (int i = 7; i >= 0; --i) {
    msg.push_back(static_cast<unsigned char>(bits >> (8 * i)));
  }
  for (std::size_t off = 0; off < msg.size(); off += 64) {
    sha1_block(h, msg.data() + off);
  }
  char out[41];
  for (int i = 0; i < 5; ++i) {
    std::snprintf(out + 8 * i, 9, "%08x", h[static_cast<std::size_t>(i)]);
  }
  return std::string(out, 40);
}

int memory_slot_cap(int slots, std::uint64_t memory_mb, long long runtime_memory_mb) {
  if (memory_mb == 0 || runtime_memory_mb <= 0) {
    return slots;
  }
  auto fit = memory_mb / static_cast<std::uint64_t>(runtime_memory_mb);
  return fit < static_cast<std::uint64_t>(slots) ? static_cast<int>(fit) : slots;
}

std::string runtime_queue(const std::string& queue, const std::string& runtime) {
  return queue + ".runtime." + runtime;
}

std::string runtimes_exchange(const std::string& queue) { return queue + ".runtimes"; }

std::string wanted_exchange(const std::string& queue) { return queue + ".runtimes.wanted"; }

std::optional<std::string> task_runtime(std::string_view runtime_name) {
  std::string rt(runtime_name);
  if (config::runtime_name_problem(rt)) {
    return std::nullopt;
  }
  return rt;
}

std::string lithops_job_name(std::string_view runtime, int memory, std::string_view version) {
  std::string name = std::string(runtime) + "-" + std::to_string(memory) + "-" + std::string(version);
  std::string dotless;
  for (char c : version) {
    if (c != '.') {
      dotless += c;
    }
  }
  return std::string(k_job_name_prefix) + dotless + "-" + sha1_hex(name).substr(0, k_job_name_hash);
}

std::optional<std::string> plain_metadata_runtime(std::string_view name) {
  auto last = name.rfind('-');
  if (last == std::string_view::npos || last == 0 || last + 1 == name.size()) {
    return std::nullopt;
  }
  auto mem = name.rfind('-', last - 1);
  if (mem == std::string_view::npos || mem == 0 || !all_digits(name.substr(mem + 1, last - mem - 1))) {
    return std::nullopt;
  }
  return std::string(name.substr(0, mem));
}

bool metadata_name_is(std::string_view name, std::string_view runtime) {
  if (runtime.empty()) {
    return false;
  }
  if (auto plain = plain_metadata_runtime(name); plain && *plain == runtime) {
    return true;
  }
  if (!name.starts_with(k_job_name_prefix)) {
    return false;
  }
  auto rest = name.substr(k_job_name_prefix.size());
  auto dash = rest.rfind('-');
  if (dash == std::string_view::npos || rest.size() - dash - 1 != k_job_name_hash) {
    return false;
  }
  auto dotless = rest.substr(0, dash);
  auto hash = rest.substr(dash + 1);
  std::string prefix = std::string(runtime) + "-" + std::to_string(k_metadata_memory) + "-";
  return any_dotted(dotless, [&](const std::string& version) {
    return sha1_hex(prefix + version).compare(0, k_job_name_hash, hash) == 0;
  });
}

}  // namespace lhpc::dispatch
