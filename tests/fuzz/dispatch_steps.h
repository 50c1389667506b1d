// What a dispatcher does with a message once decode() accepted it, replayed
// without a broker or handlers: the fuzzers of both decoder layers call this
// so a payload that decodes but breaks a later step (a split, a copy, the
// dump() into a handler's request line) is found, not only a bad decode.
// Mirrors Dispatcher::start_task/send_request (src/dispatch/dispatcher.cc).
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "dispatch/protocol.h"

namespace lhpc::fuzz {

// Aborts (a finding) when a property the dispatcher relies on is false.
inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz: property broken: %s\n", what);
    std::abort();
  }
}

// `free_slots` stands for the slots free when the message arrives (a
// dispatcher never keeps more calls than that); the fuzzer picks it. The
// steps and their copies are Dispatcher::start_task's, in its order.
inline void dispatch_decoded(dispatch::Task task, std::size_t free_slots) {
  using namespace lhpc::dispatch;
  std::vector<Json> to_start;
  if (task.action != Action::send_task) {
    // get_metadata and ping: send_control hands the payload as it is.
    to_start.push_back(std::move(task.payload));
  } else {
    require(task.calls > 0, "decode accepted a send_task without calls");
    const std::size_t keep = task.calls < free_slots ? task.calls : free_slots;
    if (keep < task.calls) {
      auto [kept, rest] = split(task.payload, keep);
      // The remainder goes back to the queue and must decode as keep..calls.
      auto again = decode(encode(Action::send_task, rest));
      const auto* t = std::get_if<Task>(&again);
      require(t != nullptr, "the republished remainder of a split does not decode");
      require(t->calls == task.calls - keep, "the remainder of a split has the wrong number of calls");
      (void)describe_calls(kept);
      to_start = one_call_payloads(kept);
    } else if (task.calls == 1) {
      // The common case: no copy of the payload.
      task.payload["total_calls"] = 1;
      task.payload["worker_processes"] = 1;
      to_start.push_back(std::move(task.payload));
    } else {
      to_start = one_call_payloads(task.payload);
    }
  }
  for (const auto& p : to_start) {
    // send_request: the line a handler reads.
    (void)p.dump();
  }
}

inline void decode_and_dispatch(std::string_view body, std::size_t free_slots) {
  auto r = dispatch::decode(body);
  if (auto* t = std::get_if<dispatch::Task>(&r)) {
    dispatch_decoded(std::move(*t), free_slots);
  } else {
    require(!std::get<dispatch::Malformed>(r).reason.empty(), "a malformed message without a reason");
  }
}

}  // namespace lhpc::fuzz
