// What autoalloc tells a Lithops client whose runtime has no image. Without
// it that client hangs: the first use of a runtime publishes a get_metadata
// and polls its storage for the answer (lithops.jobs/<name>.meta, every 2 s
// for 10 minutes), and no deployment can ever answer. The controller takes
// such requests (from its own queue bound to the runtimes' fanout exchange,
// and from the task queue when none of its runtimes has an image, so nothing
// else would take them) and writes, at the key the client reads, a JSON
// object without 'preinstalls' whose message names the runtime and the image
// looked for: the client raises "Failed getting runtime metadata: {...}".
// Pure functions, unit-tested; the broker and the storage are ports.h's.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace lhpc::autoalloc {

// A runtime a get_metadata may be for: one the controller serves, an image
// in sif_path, or Lithops' own default names.
struct KnownRuntime {
  std::string runtime;
  std::string sif;  // <sif_path>/<runtime>.sif
  bool image = false;
};

// The names the Lithops singularity backend gives a runtime when none is
// configured: 'singularity-runtime-v3XY' for its Python 3.XY.
std::vector<std::string> lithops_default_runtimes();

// nullopt: `name` (a get_metadata's runtime_name) is for a runtime whose
// image exists, its deployments answer it; else the message for the client,
// naming the runtime (when it is one of `known`) and the image path looked for.
std::optional<std::string> no_image_message(std::string_view name, const std::vector<KnownRuntime>& known,
                                            const std::string& sif_path);

// What the controller does with a message it took.
enum class Take {
  tell,   // a get_metadata for a runtime with no image: write the error, then ack
  move,   // (task queue) a send_task for a runtime with no image: to its runtime queue, then ack
  leave,  // (task queue) not ours to handle: back to the queue, and look no further this round
  drop,   // (the controller's fanout copy) a copy for a runtime with an image: ack
};
struct Handling {
  Take take = Take::leave;
  std::string runtime;     // move: the runtime whose queue it goes to
  std::string message;     // tell: the error for the client
  std::string key;         // tell: the storage key the client polls (lithops.jobs/<name>.meta)
  nlohmann::json storage;  // tell: the client's storage configuration (the get_metadata payload)
};

// `from_task_queue`: the message was taken from the task queue (else it is
// the controller's copy from the runtimes' fanout exchange).
Handling handle(std::string_view body, bool from_task_queue, const std::vector<KnownRuntime>& known,
                const std::string& sif_path);

// {"error": message} as ASCII JSON (the client decodes it as ASCII), without
// the 'preinstalls' a runtime's metadata carries.
std::string metadata_error_body(const std::string& message);

// Where Lithops' redis storage backend keeps `key` for the client whose
// storage configuration is `storage` (the get_metadata payload: backend,
// and the backend's section): key "<storage_bucket>/<key>" on host:port with
// the password. Another backend, or a section without a host: the reason
// the client cannot be told (never with the password).
struct RedisTarget {
  std::string host;
  int port = 6379;
  std::string password;  // secret: never logged
  int db = 0;
  std::string key;
};
std::variant<RedisTarget, std::string> redis_target(const nlohmann::json& storage, const std::string& key);

}  // namespace lhpc::autoalloc
