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
#include <variant>

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
// dispatcher never keeps more calls than that); the fuzzer picks it.
inline void dispatch_decoded(const dispatch::Task& task, std::size_t free_slots) {
  using namespace lhpc::dispatch;
  if (task.action != Action::send_task) {
    // get_metadata and ping go to the control handler as one request line.
    (void)task.payload.dump();
    return;
  }
  require(task.calls > 0, "decode accepted a send_task without calls");
  const std::size_t keep = task.calls < free_slots ? task.calls : free_slots;
  Json kept = task.payload;
  if (keep < task.calls) {
    auto [first, rest] = split(task.payload, keep);
    // The remainder goes back to the queue and must decode as keep..calls.
    auto again = decode(encode(Action::send_task, rest));
    const auto* t = std::get_if<Task>(&again);
    require(t != nullptr, "the republished remainder of a split does not decode");
    require(t->calls == task.calls - keep, "the remainder of a split has the wrong number of calls");
    kept = std::move(first);
  }
  (void)describe_calls(kept);
  for (const auto& p : one_call_payloads(kept)) {
    // send_request: the line a handler reads.
    (void)p.dump();
  }
}

inline void decode_and_dispatch(std::string_view body, std::size_t free_slots) {
  auto r = dispatch::decode(body);
  if (const auto* t = std::get_if<dispatch::Task>(&r)) {
    dispatch_decoded(*t, free_slots);
  } else {
    require(!std::get<dispatch::Malformed>(r).reason.empty(), "a malformed message without a reason");
  }
}

}  // namespace lhpc::fuzz
