// The read side of the controller's <state dir>/autoalloc/state.json, apart
// from the controller (which writes it): `status`, `stop --all` and a
// restarted controller read it, and it sits in a directory another user may
// have reached first. Not the writer (controller.cc: to_json, save).
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include "autoalloc/controller.h"

namespace lhpc::autoalloc {

// A state file lists the jobs of one controller: far below this.
inline constexpr std::size_t k_max_state_bytes = 16 << 20;

// The bytes of state.json: a regular file of yours, at most
// k_max_state_bytes, in the private controller directory, opened without
// following a link or waiting on a FIFO (util/fs read_private_file); nullopt
// when there is none. Throws Error naming the file and why otherwise.
std::optional<std::string> read_state_text();

}  // namespace lhpc::autoalloc
