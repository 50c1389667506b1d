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
#include <utility>
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
  tell,   // a request of a runtime with no image: write `entries` to the client's storage, then ack
  leave,  // (task queue) not ours to handle: back to the queue, and look no further this round
  drop,   // a copy of a get_metadata for a runtime with an image: ack
};
// Where the message was taken from.
enum class From {
  task_queue,
  copies,         // the controller's queue bound to the runtimes' fanout exchange
  runtime_queue,  // <queue>.runtime.<R> of a runtime of ours with no image
};
struct Handling {
  Take take = Take::leave;
  std::string runtime;  // tell, a send_task: its runtime (where it goes when the client cannot be told)
  std::string message;  // tell: the error for the client
  // tell: what to write, key (as the client names it) and value: for a
  // get_metadata its error at lithops.jobs/<name>.meta; for a send_task a
  // failed status per call.
  std::vector<std::pair<std::string, std::string>> entries;
  nlohmann::json storage;  // tell: the client's storage configuration
};

Handling handle(std::string_view body, From from, const std::vector<KnownRuntime>& known, const std::string& sif_path,
                double now);

// Lithops' status.json of a call that raised `message` (type __end__,
// exception, exc_info: the repr of a pickle of (Exception,
// Exception(message), None), which the client's future unpickles and
// raises from get_result), one per call of a send_task payload, at
// lithops.jobs/<executor_id>-<job_id>/<call_id>/status.json.
std::vector<std::pair<std::string, std::string>> failed_call_statuses(const nlohmann::json& payload,
                                                                      const std::string& message, double now);
// What Python's str(pickle.dumps((Exception, Exception(message), None),
// protocol=0)) could print: a bytes literal the client eval()s.
std::string exception_pickle_repr(const std::string& message);
// The storage configuration in a send_task payload's Lithops config:
// {"backend": B, B: config[B]}.
nlohmann::json task_storage(const nlohmann::json& payload);

// {"error": message} as ASCII JSON (the client decodes it as ASCII), without
// the 'preinstalls' a runtime's metadata carries.
std::string metadata_error_body(const std::string& message);

// Where Lithops' redis storage backend keeps the keys of the client whose
// storage configuration is `storage` (the get_metadata payload, or
// task_storage: backend, and the backend's section): host:port with the
// password, keys "<storage_bucket>/<key>". Another backend, or a section
// without a host: the reason the client cannot be told (never with the
// password).
struct RedisTarget {
  std::string host;
  int port = 6379;
  std::string password;  // secret: never logged
  int db = 0;
  std::string bucket = "storage";
  // redis-py's `ssl`: over TLS, to a server whose certificate is the file
  // `ssl_ca_certs` names (as `up` writes it with the broker's TLS).
  std::string tls_cert;
};
std::variant<RedisTarget, std::string> redis_target(const nlohmann::json& storage);

// What Lithops' redis backend sends to put `value` at "<bucket>/<key>": SADD
// of each parent "directory" (its list_keys walks them: the client's job
// monitor finds a call's status.json so), then SET.
std::vector<std::vector<std::string>> redis_put_commands(const std::string& bucket, const std::string& key,
                                                         const std::string& value);

}  // namespace lhpc::autoalloc
