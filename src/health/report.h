// The health report every rank sends rank 0 each interval: a fixed-size,
// trivially copyable struct that travels as MPI_BYTE (same binary on every
// node, so layout and byte order match). Strings are NUL-terminated in fixed
// arrays; readers never trust the terminator and use node_of()/last_error_of().
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "util/names.h"

namespace lhpc::health {

// A rank's state as it reports it. `unresponsive` is never sent: rank 0
// assigns it to a rank silent for 3 intervals.
enum class State : std::uint8_t {
  staging = 0,
  starting = 1,
  ready = 2,
  draining = 3,
  failed = 4,
  stopped = 5,
  unresponsive = 6,
  // Running, but consuming nothing: the broker connection is being made
  // again, or a consumer the broker cancelled is being restored.
  reconnecting = 7,
};

// Lower case, as in the status file and logs: "ready", "unresponsive", ...
inline constexpr Names<State, 8> k_state_names{{{
    {State::staging, "staging"},
    {State::starting, "starting"},
    {State::ready, "ready"},
    {State::draining, "draining"},
    {State::failed, "failed"},
    {State::stopped, "stopped"},
    {State::unresponsive, "unresponsive"},
    {State::reconnecting, "reconnecting"},
}}};

inline constexpr std::uint32_t k_report_version = 4;
inline constexpr std::size_t k_node_len = 64;         // bytes, including the NUL
inline constexpr std::size_t k_last_error_len = 160;  // bytes, including the NUL
inline constexpr std::size_t k_gpus_len = 256;        // bytes, including the NUL

// 8-byte fields first, then 4, then 1, then the strings: no implicit padding,
// so no uninitialised bytes go on the wire.
struct Report {
  std::uint64_t seq = 0;            // per rank, +1 each report; rank 0 drops older ones
  std::uint64_t done = 0;           // tasks finished and acked
  std::uint64_t failed = 0;         // tasks whose function raised (still acked: Lithops reports it)
  std::uint64_t requeued = 0;       // tasks given back to the queue (handler/instance died, drain)
  std::uint64_t dead_lettered = 0;  // tasks moved to the dead-letter queue
  std::uint64_t rss_kb = 0;         // VmRSS of the rank process itself
  std::uint64_t rss_tree_kb = 0;    // rss_kb + VmRSS of all its descendants (handlers)
  std::uint64_t duplicates = 0;     // calls finished after the broker took their message back (it runs again)
  std::uint64_t gpus_out = 0;       // bit k: GPU slot k is out of service (its handler kept dying)
  double uptime = 0;                // seconds since this rank started
  double timestamp = 0;             // sender's unix time (informative: clocks differ across nodes)
  std::uint32_t version = k_report_version;
  std::int32_t rank = -1;
  std::int32_t pid = 0;  // of the rank process, on its node
  std::int32_t slots_busy = 0;
  std::int32_t slots_total = 0;
  std::uint32_t restarts = 0;  // instance/handler/runscript restarts so far
  State state = State::staging;
  std::uint8_t broker_connected = 0;  // 0/1
  std::uint8_t instance_alive = 0;    // 0/1
  std::uint8_t consuming = 0;         // 0/1: the task queue's consumer is up
  std::uint8_t broker_blocked = 0;    // 0/1: connection.blocked (a broker memory or disk alarm)
  std::uint8_t reserved[3] = {};      // zero; keeps sizeof a multiple of 8 with no tail padding
  char node[k_node_len] = {};
  char last_error[k_last_error_len] = {};
  // A GPU runtime's slots and their devices: "0,1;2,3" (slot k's devices
  // are the k-th ';'-separated group); empty: a CPU runtime.
  char gpus[k_gpus_len] = {};
  // Why: "slot 2: died 6 times within 60 s (...); last: ...; slot 3: ...".
  char gpus_out_why[k_gpus_len] = {};
  // Each device of `gpus`, in order: "used/total" MiB, "-" where unknown;
  // empty: no figures (no nvidia-smi, an AMD or CPU runtime).
  char gpu_memory[k_gpus_len] = {};
};

static_assert(std::is_trivially_copyable_v<Report>);
static_assert(std::is_standard_layout_v<Report>);
static_assert(sizeof(Report) == 9 * 8 + 2 * 8 + 6 * 4 + 8 + k_node_len + k_last_error_len + 3 * k_gpus_len,
              "Report must have no padding: every byte on the wire is initialised");

// Copies `node` (truncated to 63 bytes on a UTF-8 boundary).
void set_node(Report& r, std::string_view node);
// Redacts every AMQP URL's password, flattens newlines and control characters
// to spaces, then truncates to 159 bytes on a UTF-8 boundary ("..." marks a cut).
void set_last_error(Report& r, std::string_view text);
// Slot k's devices as "a,b;c,d"; slots that do not fit in 255 bytes are
// left out whole (a status shows fewer, never a cut device id).
void set_gpus(Report& r, const std::vector<std::vector<std::string>>& slots);
std::vector<std::vector<std::string>> gpus_of(const Report& r);
// The slots out of service (slot -> why; slots past 63 are left out) into
// gpus_out and gpus_out_why (secrets redacted, cut like last_error); read
// back as the slot numbers and the one text.
void set_gpus_out(Report& r, const std::map<int, std::string>& out);
std::vector<int> gpus_out_of(const Report& r);
std::string gpus_out_why_of(const Report& r);
// Memory per device of `gpus` in MiB (used, total), nullopt where unknown;
// devices that do not fit are left out (read back as unknown).
using GpuMemory = std::optional<std::pair<std::uint64_t, std::uint64_t>>;
void set_gpu_memory(Report& r, const std::vector<GpuMemory>& per_device);
std::vector<GpuMemory> gpu_memory_of(const Report& r);
// Read back, stopping at the first NUL or the array's end (never past it).
std::string node_of(const Report& r);
std::string last_error_of(const Report& r);

// `text` with the password of every amqp:// or amqps:// URL in it replaced by
// *** (config::redact_url on each URL). A URL ends at whitespace, a quote,
// '<', '>', ',', ';', ')' or ']'.
std::string redact_secrets(std::string_view text);
// At most `max_bytes` bytes of `s`, never cutting a UTF-8 sequence; a cut text
// ends with "..." (within max_bytes).
std::string truncate_utf8(std::string_view s, std::size_t max_bytes);

// Checks a report received from `source`: version and sizes; false: drop it.
bool valid(const Report& r);

// Unix time now, in seconds (sub-second precision).
double unix_now();

}  // namespace lhpc::health
