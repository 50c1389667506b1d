#include "autoalloc/no_image.h"

#include <fmt/format.h>

#include "dispatch/protocol.h"
#include "dispatch/runtime.h"
#include "util/strings.h"

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

Handling for_metadata(const dispatch::Task& t, From from, const std::vector<KnownRuntime>& known,
                      const std::string& sif_path) {
  std::string name = dispatch::json_string(t.payload, "runtime_name");
  auto message = name.empty() ? std::nullopt : no_image_message(name, known, sif_path);
  if (!message) {
    return {from == From::task_queue ? Take::leave : Take::drop};
  }
  if (from == From::runtime_queue) {
    return {Take::drop};  // a copy: the controller's own copies queue has one too
  }
  Handling h{Take::tell};
  h.message = *message;
  h.entries = {{std::string(k_jobs_prefix) + name + ".meta", metadata_error_body(*message)}};
  h.storage = t.payload;
  return h;
}

Handling for_task(const dispatch::Task& t, const std::vector<KnownRuntime>& known, const std::string& sif_path,
                  double now) {
  auto runtime = dispatch::task_runtime(dispatch::json_string(t.payload, "runtime_name"));
  if (!runtime || has_image(*runtime, known)) {
    return {Take::leave};
  }
  std::string sif = sif_path + "/" + *runtime + ".sif";
  for (const auto& k : known) {
    sif = k.runtime == *runtime ? k.sif : sif;
  }
  Handling h{Take::tell};
  h.runtime = *runtime;
  h.message =
      fmt::format("lithops-hpc: runtime '{}' has no image: looked for {}; {}", *runtime, sif, build_hint(*runtime));
  h.entries = failed_call_statuses(t.payload, h.message, now);
  h.storage = task_storage(t.payload);
  return h;
}

// Python's protocol-0 UNICODE argument: raw-unicode-escape up to a newline.
std::string pickle_unicode(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c == '\\' || c == '\n' || c == '\r' || c == 0 || c == 0x1a) {
      out += fmt::format("\\u{:04x}", c);
    } else {
      out += c < 0x80 ? static_cast<char>(c) : '?';
    }
  }
  return out;
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

Handling handle(std::string_view body, From from, const std::vector<KnownRuntime>& known, const std::string& sif_path,
                double now) {
  auto decoded = dispatch::decode(body);
  const auto* t = std::get_if<dispatch::Task>(&decoded);
  Take other = from == From::copies ? Take::drop : Take::leave;
  if (!t) {
    return {other};  // the deployments dead-letter it
  }
  if (t->action == dispatch::Action::get_metadata) {
    return for_metadata(*t, from, known, sif_path);
  }
  if (from == From::copies || t->action != dispatch::Action::send_task) {
    return {other};
  }
  return for_task(*t, known, sif_path, now);
}

std::string exception_pickle_repr(const std::string& message) {
  std::string pickle = "(cbuiltins\nException\ncbuiltins\nException\n(V" + pickle_unicode(message) + "\ntRNt.";
  std::string out = "b'";
  for (unsigned char c : pickle) {
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c >= 0x7f) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

std::vector<std::pair<std::string, std::string>> failed_call_statuses(const json& payload, const std::string& message,
                                                                      double now) {
  std::vector<std::pair<std::string, std::string>> out;
  auto executor = dispatch::json_string(payload, "executor_id");
  auto job = dispatch::json_string(payload, "job_id");
  const auto ids = payload.find("call_ids");
  if (executor.empty() || job.empty() || ids == payload.end() || !ids->is_array()) {
    return out;
  }
  auto exc = exception_pickle_repr(message);
  for (const auto& id : *ids) {
    if (!id.is_string()) {
      continue;
    }
    auto call = id.get<std::string>();
    json st = {{"exception", true},
               {"exc_info", exc},
               {"activation_id", "lithops-hpc-autoalloc"},
               {"python_version", nullptr},
               {"worker_start_tstamp", now},
               {"worker_end_tstamp", now},
               {"host_submit_tstamp", payload.value("host_submit_tstamp", json(now))},
               {"call_id", call},
               {"job_id", job},
               {"executor_id", executor},
               {"chunksize", payload.value("chunksize", json(1))},
               {"worker_cold_start", true},
               {"type", "__end__"}};
    auto key = std::string(k_jobs_prefix) + executor + "-" + job + "/" + call + "/status.json";
    out.emplace_back(key, st.dump(-1, ' ', true, json::error_handler_t::replace));
  }
  return out;
}

json task_storage(const json& payload) {
  const auto c = payload.find("config");
  if (c == payload.end() || !c->is_object() || !c->contains("lithops") || !(*c)["lithops"].is_object()) {
    return json::object();
  }
  auto backend = dispatch::json_string((*c)["lithops"], "storage");
  json out = {{"backend", backend}};
  if (!backend.empty() && c->contains(backend)) {
    out[backend] = (*c)[backend];
  }
  return out;
}

std::string metadata_error_body(const std::string& message) {
  return json{{"error", message}}.dump(-1, ' ', true, json::error_handler_t::replace);
}

std::variant<RedisTarget, std::string> redis_target(const json& storage) {
  std::string backend = storage.is_object() ? dispatch::json_string(storage, "backend") : "";
  if (backend != "redis") {
    return fmt::format("the client's storage backend is '{}': autoalloc can tell a client through redis only",
                       backend.empty() ? "?" : bounded_for_log(backend, 40));
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
  t.bucket = dispatch::json_string(r, "storage_bucket", "storage");
  if (dispatch::json_bool(r, "ssl", false)) {
    t.tls_cert = dispatch::json_string(r, "ssl_ca_certs");
    if (t.tls_cert.empty()) {
      return std::string(
          "the client's redis uses TLS without ssl_ca_certs: autoalloc talks TLS to a known certificate only");
    }
  }
  if (t.port <= 0 || t.port > 65535) {
    return fmt::format("the client's redis port {} is not a port", t.port);
  }
  return t;
}

std::vector<std::vector<std::string>> redis_put_commands(const std::string& bucket, const std::string& key,
                                                         const std::string& value) {
  std::vector<std::string> parts;
  std::string full = bucket + "/" + key;
  for (std::size_t from = 0;;) {
    auto slash = full.find('/', from);
    parts.push_back(full.substr(from, slash == std::string::npos ? std::string::npos : slash - from));
    if (slash == std::string::npos) {
      break;
    }
    from = slash + 1;
  }
  std::vector<std::vector<std::string>> out;
  std::string dir;
  for (std::size_t i = 1; i < parts.size(); ++i) {
    dir += parts[i - 1] + "/";
    out.push_back({"SADD", dir, parts[i] + (i + 1 < parts.size() ? "/" : "")});
  }
  out.push_back({"SET", full, value});
  return out;
}

}  // namespace lhpc::autoalloc
