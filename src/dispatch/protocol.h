// The Lithops singularity-backend message protocol, as pure functions:
// bounding and decoding a task message (from bytes: the fuzzing harnesses call
// the same entry points), classifying malformed ones, splitting a send_task
// across free slots and building the one-call payloads handlers run.
// Facts: docs/lithops-protocol.md. No I/O here: everything is unit-tested.
#pragma once

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "util/names.h"

namespace lhpc::dispatch {

using Json = nlohmann::json;

// Standard alphabet with padding, as Python's base64.b64encode.
std::string base64_encode(std::string_view bytes);
// Mirrors base64.b64decode(): standard alphabet, padding required; ASCII
// whitespace is skipped. nullopt when the text is not valid base64.
std::optional<std::string> base64_decode(std::string_view text);

enum class Action { send_task, get_metadata, ping };
// As the message's "action" field spells it.
inline constexpr Names<Action, 3> k_action_names{
    {{{Action::send_task, "send_task"}, {Action::get_metadata, "get_metadata"}, {Action::ping, "ping"}}}};

// A message that follows the protocol.
struct Task {
  Action action = Action::send_task;
  Json payload;           // the decoded payload object
  std::size_t calls = 0;  // send_task: number of calls (len(call_ids)); 0 otherwise
};

// A message that does not: it is dead-lettered with `reason`, never retried.
struct Malformed {
  std::string reason;
};

// Bounds checked on the bytes before anything is parsed: anyone who can
// publish to the queue chooses a message's size and nesting, and nlohmann's
// dump() and copies recurse once per level (about 100,000 levels overflow
// the stack). Configured as [rabbitmq] max_message_bytes/max_message_depth.
inline constexpr std::size_t k_default_max_message_bytes = 16u << 20;
inline constexpr int k_default_max_message_depth = 64;
struct Limits {
  std::size_t max_bytes = k_default_max_message_bytes;
  int max_depth = k_default_max_message_depth;
};

// True when `json` opens more than `max_depth` arrays/objects at once. One
// pass, no recursion, no allocation; strings (and their escapes) are skipped;
// the text need not be valid JSON (the parser judges that afterwards).
bool nests_deeper_than(std::string_view json, int max_depth);

// Body -> Task, or Malformed with a reason naming the defect (over the size
// or depth limit, not JSON, no action, unknown action, no payload, bad
// base64, payload not a JSON object, call_ids/data_byte_ranges missing or of
// different lengths, total_calls different from the number of calls).
// Both layers are bounded: the body's size and depth before it is parsed,
// the decoded payload's depth before it is parsed.
std::variant<Task, Malformed> decode(std::string_view body, const Limits& limits = {});
// The inner layer alone: the payload's JSON text (base64 already undone), as
// decode() judges it. An entry point for fuzzing.
std::variant<Task, Malformed> decode_payload(Action action, std::string_view payload_json, const Limits& limits = {});

// {"action": A, "payload": base64(json(payload))}: what the Lithops client publishes.
std::string encode(Action action, const Json& payload);
// The same from the payload's JSON text.
std::string encode_text(Action action, std::string_view payload_json);

// A send_task payload taken apart once into what the dispatcher hands out:
// the members every call shares, serialized once, and each call's id and byte
// range serialized alone. Slices and one-call payloads are then built as text
// from these pieces: splitting a message of N calls costs its size once,
// never a copy of the whole payload per slice.
class Calls {
public:
  Calls() = default;
  // Takes the payload apart (moving out of it); it must have passed decode().
  explicit Calls(Json&& payload);
  std::size_t size() const { return m_ids.size(); }
  const std::string& job_key() const { return m_job_key; }
  // The payload of calls [from, to) as JSON text: same indices of call_ids
  // and data_byte_ranges, total_calls = to - from, worker_processes as
  // delivered, or 1 with `one_call` (what a handler process is given: one
  // call per process; Lithops' own multi-process path fails on Linux).
  std::string slice(std::size_t from, std::size_t to, bool one_call = false) const;
  // "job-key/00003" or "job-key/00000..00004 (5 calls)", for logs: control
  // characters escaped and at most k_logged_id_bytes, since the job key and
  // the call ids are whatever the publisher wrote.
  std::string describe(std::size_t from, std::size_t to) const;

private:
  std::string m_shared;            // `"k":v,` for every other member, in order
  std::string m_worker_processes;  // its JSON text; empty when absent
  std::string m_job_key = "?";
  std::vector<std::string> m_ids, m_ranges;
};

// Bound on a job key or call range in a log line.
inline constexpr std::size_t k_logged_id_bytes = 256;

// The call ids of a send_task payload, for logs ("job-key/00003"), bounded
// and escaped as Calls::describe.
std::string describe_calls(const Json& payload);

// Messages a rank takes beyond what it can start and what it holds: the
// reserve of prefetch_for.
inline constexpr int k_reserve = 1;

// How long a task waits in the reserve before the rank gives it back once
// (dispatcher.h): short against the tasks worth spreading (seconds), long
// against a no-op task's wait for a slot (milliseconds).
inline constexpr std::chrono::milliseconds k_reserve_patience{200};

// How many unacked messages a dispatcher lets the broker hand it: one per
// free slot, plus every message it already holds that needs an ack (started
// tasks, whose calls still hold slots, and control requests), plus one
// reserve. The reserve takes a control message (answered at once, then held,
// which frees the reserve again) or one task, which waits here for the next
// free slot; while it waits and every slot is busy the broker hands this
// rank nothing: no traffic, and no reordering beyond that one message.
// Never 0 (that would mean "unlimited"); at most basic.qos's 65535.
int prefetch_for(int free_slots, int held_messages);

// The queue one rank of a deployment also consumes (no-ack, not exclusive,
// auto-delete) on a channel of its own: `ping` addresses each rank through it.
std::string rank_queue(const std::string& queue, const std::string& job, int rank);

// Dead-letter and crash-accounting header names (AMQP table keys).
inline constexpr const char* k_hdr_crashes = "x-lithops-hpc-crashes";
inline constexpr const char* k_hdr_reason = "x-lithops-hpc-reason";
inline constexpr const char* k_hdr_rank = "x-lithops-hpc-rank";
inline constexpr const char* k_hdr_host = "x-lithops-hpc-host";
inline constexpr const char* k_hdr_message_id = "x-lithops-hpc-message-id";
inline constexpr const char* k_hdr_redelivered = "x-lithops-hpc-redelivered";
inline constexpr const char* k_hdr_exchange = "x-lithops-hpc-original-exchange";
inline constexpr const char* k_hdr_routing_key = "x-lithops-hpc-original-routing-key";
inline constexpr const char* k_hdr_time = "x-lithops-hpc-time";
// Set by the benchmark publisher (bench/dispatch_bench.cc): wall-clock ns of
// the publish, so a test build's dispatcher can log publish->ack latency when
// LITHOPS_HPC_LATENCY_LOG is set. Read by nothing in a release build.
inline constexpr const char* k_hdr_sent_ns = "x-lithops-hpc-sent-ns";

// A stable id for logs and dead-letter headers when the message carries no
// message_id property: "body-" + 16 hex digits of a hash of the body, the
// same on every redelivery.
std::string body_id(std::string_view body);

// Lenient readers for lines from other processes: the fallback when the key
// is missing or of another type (nlohmann's value() throws on a wrong type).
std::string json_string(const Json& j, const char* key, const std::string& fallback = {});
long long json_int(const Json& j, const char* key, long long fallback = 0);
bool json_bool(const Json& j, const char* key, bool fallback = false);

// Ping: the request payload the CLI sends and the reply the dispatcher publishes.
Json ping_reply(int rank, const std::string& node, const Json& echo);

}  // namespace lhpc::dispatch
