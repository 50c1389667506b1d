// Which Lithops runtime a message is for, and where a message for another
// runtime goes. A deployment serves one runtime (its image); the unmodified
// Lithops client publishes every runtime's messages to the one task queue, so
// a dispatcher moves what is not its own (dispatcher.h says how). Pure
// functions: no I/O, unit-tested.
//
// Facts (Lithops 3.7, serverless/backends/singularity/singularity.py):
// - send_task: the payload's `runtime_name` is the runtime itself, the image
//   name the user configured (`singularity.runtime`) or passed to
//   FunctionExecutor(runtime=...);
// - get_metadata: `runtime_name` is `_format_job_name(runtime, 128)`, which
//   the client builds as 'lithops-worker-' + version without dots + '-' +
//   sha1('<runtime>-128-<version>')[:10]. The runtime cannot be read back out
//   of it; a deployment can only tell whether it is its own. The plain form
//   '<runtime>-<memory>-<version>' is understood as well.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lhpc::dispatch {

// The durable queue a runtime's deployments consume beside the task queue:
// "<queue>.runtime.<runtime>". `runtime` must be a valid runtime name
// (config::runtime_name_problem): it becomes part of a queue name.
std::string runtime_queue(const std::string& queue, const std::string& runtime);

// The fanout exchange every runtime queue is bound to: a get_metadata that is
// not a deployment's own is published there, so that a copy waits in every
// runtime's queue and the deployments of the runtime it is for answer it
// (the others drop their copy). "<queue>.runtimes".
std::string runtimes_exchange(const std::string& queue);

// The fanout exchange a deployment tells about a runtime queue it moved a
// task to while nothing consumed that queue (a runtime no deployment serves;
// perhaps one whose image is gone): "<queue>.runtimes.wanted". No runtime
// queue is bound to it, so no deployment ever receives such a notice; the
// autoalloc controller binds its own queue to it and answers the tasks of a
// runtime with no image (autoalloc/no_image.h). A notice is an empty body
// with the header k_hdr_wanted_runtime naming the runtime.
std::string wanted_exchange(const std::string& queue);
inline constexpr const char* k_hdr_wanted_runtime = "x-lithops-hpc-wanted-runtime";
// A rank tells about one runtime at most this often.
inline constexpr int k_wanted_notice_interval_s = 10;

// How long a copy of a get_metadata waits in a runtime queue (the message's
// expiration, ms): the client polls for its answer for about 10 minutes.
inline constexpr const char* k_metadata_copy_ttl_ms = "600000";

// The runtime a send_task payload's `runtime_name` names, when it is a valid
// runtime name; nullopt when it is not.
std::optional<std::string> task_runtime(std::string_view runtime_name);

// Whether a get_metadata's `runtime_name` is the one the client builds for
// `runtime`: the hashed form (any Lithops version, memory 128) or the plain
// '<runtime>-<memory>-<version>' (runtimes may contain '-').
bool metadata_name_is(std::string_view name, std::string_view runtime);

// The plain form's runtime: '<runtime>-<digits>-<version>' -> runtime;
// nullopt when the name is not of that form.
std::optional<std::string> plain_metadata_runtime(std::string_view name);

// What the client's _format_job_name gives for (runtime, memory, version).
std::string lithops_job_name(std::string_view runtime, int memory, std::string_view version);

// Task slots a rank of `memory_mb` MiB can give a runtime of
// `runtime_memory_mb` each: min(slots, memory / runtime_memory); 0 when one
// does not fit; `slots` when either is unknown (0).
int memory_slot_cap(int slots, std::uint64_t memory_mb, long long runtime_memory_mb);

// SHA-1 of `bytes` as 40 lower-case hex digits (what Python's
// hashlib.sha1(...).hexdigest() prints); only to match the client's names.
std::string sha1_hex(std::string_view bytes);

}  // namespace lhpc::dispatch
