// The Lithops singularity-backend message protocol, as pure functions:
// decoding a task message, classifying malformed ones, splitting a send_task
// across free slots and building the one-call payloads handlers run.
// Facts: shared/lithops-protocol.md. No I/O here: everything is unit-tested.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace lhpc::dispatch {

using Json = nlohmann::json;

// Standard alphabet with padding, as Python's base64.b64encode.
std::string base64_encode(std::string_view bytes);
// Mirrors base64.b64decode(): standard alphabet, padding required; ASCII
// whitespace is skipped. nullopt when the text is not valid base64.
std::optional<std::string> base64_decode(std::string_view text);

enum class Action { send_task, get_metadata, ping };
std::string to_string(Action a);
std::optional<Action> parse_action(std::string_view s);

// A message that follows the protocol.
struct Task {
  Action action = Action::send_task;
  Json payload;            // the decoded payload object
  std::size_t calls = 0;   // send_task: number of calls (len(call_ids)); 0 otherwise
};

// A message that does not: it is dead-lettered with `reason`, never retried.
struct Malformed {
  std::string reason;
};

// Body -> Task, or Malformed with a reason naming the defect (not JSON, no
// action, unknown action, no payload, bad base64, payload not a JSON object,
// call_ids/data_byte_ranges missing or of different lengths, total_calls
// different from the number of calls).
std::variant<Task, Malformed> decode(std::string_view body);

// {"action": A, "payload": base64(json(payload))}: what the Lithops client publishes.
std::string encode(Action action, const Json& payload);

// The first `n` calls and the rest, both valid send_task payloads of the same
// shape: same indices of call_ids and data_byte_ranges, total_calls updated.
// Requires 0 < n < calls.
std::pair<Json, Json> split(const Json& payload, std::size_t n);

// One payload per call of a send_task, each with total_calls = 1 and
// worker_processes = 1: what a handler process is given (one call per
// process; Lithops' own multi-process path fails on Linux).
std::vector<Json> one_call_payloads(const Json& payload);

// The call ids of a send_task payload, for logs ("job-key/00003").
std::string describe_calls(const Json& payload);

// How many messages a dispatcher lets the broker hand it: one per free slot,
// one per started message still holding slots (they stay unacked until their
// calls finish), plus one of lookahead so a get_metadata or ping arriving while
// every slot is busy reaches the control handler at once. With single-call
// messages this is always slots + 1.
int prefetch_for(int free_slots, int started_task_messages);

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
// Set by the benchmark publisher: wall-clock ns of the publish, so the
// dispatcher can log publish->ack latency when LITHOPS_HPC_LATENCY_LOG is set.
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
