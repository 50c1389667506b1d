#include "autoalloc/no_image.h"

#include <fmt/format.h>

#include "dispatch/protocol.h"
#include "dispatch/runtime.h"

namespace lhpc::autoalloc {

namespace {

using json = nlohmann::json;

// Python 3.6 to 3.20: the versions a Lithops client may run, with room.
constexpr int k_first_minor = 6, k_last_minor = 20;

// The Lithops client's metadata prefix (lithops/constants.py JOBS_PREFIX).
constexpr const char* k_jobs_prefix = "lithops.jobs/";

std::string build_hint(const std::string& runtime) {
  return fmt::format(
      "build it (lithops-hpc runtime build {0}) or copy {0}.sif there; autoalloc serves it once it "
      "exists (autoalloc.runtimes, --runtime or singularity.runtime)",
      runtime);
}

const KnownRuntime* which(std::string_view name, const std::vector<KnownRuntime>& known) {
  for (const auto& k : known) {
    if (dispatch::metadata_name_is(name, k.runtime)) {
      return &k;
    }
  }
  return nullptr;
}

bool has_image(const std::string& runtime, const std::vector<KnownRuntime>& known) {
  for (const auto& k : known) {
    if (k.runtime == runtime) {
      return k.image;
    }
  }
  return false;
}

Handling for_metadata(const dispatch::Task& t, bool from_task_queue, const std::vector<KnownRuntime>& known,
                      const std::string& sif_path) {
  std::string name = dispatch::json_string(t.payload, "runtime_name");
  auto message = name.empty() ? std::nullopt : no_image_message(name, known, sif_path);
  if (!message) {
    return {from_task_queue ? Take::leave : Take::drop};
  }
  Handling h{Take::tell};
  h.message = *message;
  h.key = std::string(k_jobs_prefix) + name + ".meta";
  h.storage = t.payload;
  return h;
}

}  // namespace

std::vector<std::string> lithops_default_runtimes() {
  std::vector<std::string> out;
  for (int minor = k_first_minor; minor <= k_last_minor; ++minor) {
    out.push_back(fmt::format("singularity-runtime-v3{}", minor));
  }
  return out;
}

std::optional<std::string> no_image_message(std::string_view name, const std::vector<KnownRuntime>& known,
                                            const std::string& sif_path) {
  if (const auto* k = which(name, known)) {
    if (k->image) {
      return std::nullopt;
    }
    return fmt::format("lithops-hpc: runtime '{}' has no image: looked for {}; {}", k->runtime, k->sif,
                       build_hint(k->runtime));
  }
  std::string images;
  for (const auto& k : known) {
    if (k.image) {
      images += (images.empty() ? "" : ", ") + k.runtime;
    }
  }
  return fmt::format(
      "lithops-hpc: the runtime of this request (get_metadata '{}') has no image: looked for {}/<runtime>.sif; "
      "runtimes with an image: {}; {}",
      name, sif_path, images.empty() ? "none" : images, build_hint("<runtime>"));
}

Handling handle(std::string_view body, bool from_task_queue, const std::vector<KnownRuntime>& known,
                const std::string& sif_path) {
  auto decoded = dispatch::decode(body);
  const auto* t = std::get_if<dispatch::Task>(&decoded);
  if (!t) {
    return {from_task_queue ? Take::leave : Take::drop};  // the deployments dead-letter it
  }
  if (t->action == dispatch::Action::get_metadata) {
    return for_metadata(*t, from_task_queue, known, sif_path);
  }
  if (!from_task_queue || t->action != dispatch::Action::send_task) {
    return {from_task_queue ? Take::leave : Take::drop};
  }
  auto runtime = dispatch::task_runtime(dispatch::json_string(t->payload, "runtime_name"));
  if (!runtime || has_image(*runtime, known)) {
    return {Take::leave};
  }
  Handling h{Take::move};
  h.runtime = *runtime;
  return h;
}

std::string metadata_error_body(const std::string& message) {
  return json{{"error", message}}.dump(-1, ' ', true, json::error_handler_t::replace);
}

std::variant<RedisTarget, std::string> redis_target(const json& storage, const std::string& key) {
  std::string backend = storage.is_object() ? dispatch::json_string(storage, "backend") : "";
  if (backend != "redis") {
    return fmt::format("the client's storage backend is '{}': autoalloc can tell a client through redis only",
                       backend.empty() ? "?" : backend);
  }
  const auto it = storage.find("redis");
  if (it == storage.end() || !it->is_object() || !it->contains("host") || !(*it)["host"].is_string()) {
    return std::string("the client's redis section names no host");
  }
  const auto& r = *it;
  RedisTarget t;
  t.host = r["host"].get<std::string>();
  t.port = static_cast<int>(dispatch::json_int(r, "port", 6379));
  t.db = static_cast<int>(dispatch::json_int(r, "db", 0));
  t.password = dispatch::json_string(r, "password");
  t.key = dispatch::json_string(r, "storage_bucket", "storage") + "/" + key;
  if (t.port <= 0 || t.port > 65535) {
    return fmt::format("the client's redis port {} is not a port", t.port);
  }
  return t;
}

}  // namespace lhpc::autoalloc
