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
  if (task.action != Action::send_task) {
    // get_metadata and ping: send_control hands the payload as it is.
    (void)task.payload.dump();
    return;
  }
  require(task.calls > 0, "decode accepted a send_task without calls");
  Calls calls(std::move(task.payload));  // start_task takes the payload apart once
  require(calls.size() == task.calls, "Calls and decode disagree on the number of calls");
  const std::size_t keep = task.calls < free_slots ? task.calls : free_slots;
  if (keep < calls.size()) {
    // The remainder goes back to the queue and must decode as keep..calls.
    auto again = decode(encode_text(Action::send_task, calls.slice(keep, calls.size())));
    const auto* t = std::get_if<Task>(&again);
    require(t != nullptr, "the republished remainder of a split does not decode");
    require(t->calls == task.calls - keep, "the remainder of a split has the wrong number of calls");
  }
  (void)calls.describe(0, keep);
  for (std::size_t i = 0; i < keep; ++i) {
    // send_request: the one-call payload a handler reads must decode as one call.
    auto one = decode(encode_text(Action::send_task, calls.slice(i, i + 1, /*one_call=*/true)));
    const auto* t = std::get_if<Task>(&one);
    require(t != nullptr && t->calls == 1, "a one-call slice does not decode as one call");
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
