#include "config/client_lint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>

#include "sif/sif.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/process.h"
#include "util/strings.h"

namespace lhpc::config {

namespace {

constexpr const char* k_python_label = "org.lithops-hpc.python-version";
constexpr std::int64_t k_max_metadata_bytes = 1 << 20;

std::string lower(std::string s) {
  for (auto& c : s) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

// "3.11.4" -> "3.11"; nullopt when it does not start with digits.digits.
std::optional<std::string> major_minor(const std::string& v) {
  std::size_t i = 0;
  while (i < v.size() && std::isdigit(static_cast<unsigned char>(v[i]))) {
    ++i;
  }
  if (i == 0 || i >= v.size() || v[i] != '.') {
    return std::nullopt;
  }
  std::size_t j = i + 1;
  while (j < v.size() && std::isdigit(static_cast<unsigned char>(v[j]))) {
    ++j;
  }
  return j == i + 1 ? std::nullopt : std::optional<std::string>(v.substr(0, j));
}

bool backend_is_singularity(const LithopsClient& l) { return l.backend && l.backend->text == "singularity"; }

// lithops/config.py load_config: no file (and no $LITHOPS_CONFIG) means localhost mode.
void check_found(const LithopsClient& l, std::vector<Finding>& out) {
  if (l.source.empty()) {
    out.push_back({Finding::Level::warning,
                   "no Lithops config found ($LITHOPS_CONFIG_FILE, ./.lithops_config, ~/.lithops/config, "
                   "/etc/lithops/config): the Lithops client runs everything in localhost mode; create "
                   "~/.lithops/config with lithops.backend: singularity, singularity.runtime and rabbitmq.amqp_url "
                   "(see the README's quick start)"});
  }
}

// lithops/config.py default_config: the backend picks the compute module.
void check_backend(const LithopsClient& l, std::vector<Finding>& out) {
  if (l.source.empty() || backend_is_singularity(l)) {
    return;
  }
  out.push_back({Finding::Level::warning,
                 (l.backend ? l.where(*l.backend) + ": lithops.backend is '" + l.backend->text + "'"
                            : l.source + ": lithops.backend is not set") +
                     ": the Lithops client does not send tasks to these workers; set `backend: singularity` "
                     "under `lithops:`"});
}

// singularity.py get_runtime_info/deploy_runtime: no runtime (or "default")
// means singularity-runtime-v<py>, which the client builds itself.
void check_runtime(const LithopsClient& l, std::vector<Finding>& out) {
  if (l.source.empty()) {
    return;
  }
  bool is_default = !l.runtime || l.runtime->text == "default" || starts_with(l.runtime->text, "singularity-runtime-v");
  if (!is_default) {
    return;
  }
  out.push_back({Finding::Level::warning,
                 (l.runtime ? l.where(*l.runtime) + ": singularity.runtime is '" + l.runtime->text + "'"
                            : l.source + ": singularity.runtime is not set") +
                     ", Lithops' default image name: the Lithops client then runs `singularity build` itself, on "
                     "the login node, at its first call; build the image once with `lithops-hpc runtime build "
                     "NAME` and set `runtime: NAME` under `singularity:`"});
}

// lithops/config.py default_config: "Localhost storage backend cannot be used with singularity".
void check_storage(const LithopsClient& l, std::vector<Finding>& out) {
  if (!l.storage || l.storage->text != "localhost" || !backend_is_singularity(l)) {
    return;
  }
  out.push_back({Finding::Level::warning,
                 l.where(*l.storage) + ": lithops.storage is 'localhost' with backend singularity: Lithops refuses "
                                       "it (\"Localhost storage backend cannot be used with singularity\"); set "
                                       "`storage:` to an object store both the client and the nodes reach (e.g. "
                                       "minio, ceph, redis) and configure its section"});
}

// invokers.py: the client raises when its Python major.minor differs from the runtime metadata's.
void check_python(const ClientFacts& f, const std::string& image, std::vector<Finding>& out) {
  if (!f.client_python) {
    out.push_back({Finding::Level::note, "cannot tell the client's Python version (python3 not found on PATH)"});
    return;
  }
  if (!f.image_python) {
    out.push_back({Finding::Level::note, "cannot tell the image's Python version: " + f.image_python_why +
                                             "; check it with: singularity exec " + shell_quote(image) +
                                             " python3 --version (it must be " + *f.client_python + ")"});
    return;
  }
  if (*f.client_python != *f.image_python) {
    out.push_back({Finding::Level::warning, "the client's Python is " + *f.client_python + " but the image " + image +
                                                " has Python " + *f.image_python +
                                                ": the Lithops client refuses to run (it compares them against the "
                                                "runtime metadata); run the client with Python " +
                                                *f.image_python +
                                                ", or rebuild the image from python:" + *f.client_python});
  }
}

// lithops/constants.py LOGGER_LEVEL = 'info' when lithops.log_level is unset.
void check_log_level(const LithopsClient& l, std::vector<Finding>& out) {
  if (l.source.empty()) {
    return;
  }
  auto level = l.log_level ? lower(l.log_level->text) : "info";
  if (level != "info" && level != "debug") {
    return;
  }
  out.push_back({Finding::Level::warning,
                 (l.log_level ? l.where(*l.log_level) + ": lithops.log_level is " + l.log_level->text
                              : l.source + ": lithops.log_level is not set (Lithops' default: INFO)") +
                     ": the client prints several lines per call; set `log_level: WARNING` under `lithops:`"});
}

bool same_broker(const std::string& a, const std::string& b) {
  try {
    auto x = parse_amqp_url(a);
    auto y = parse_amqp_url(b);
    return x.tls == y.tls && x.host == y.host && x.port == y.port && x.vhost == y.vhost && x.user == y.user &&
           x.password == y.password;
  } catch (const Error&) {
    return a == b;
  }
}

// singularity/config.py load_config: the client needs rabbitmq.amqp_url, and
// singularity.py publishes to 'task_queue' on it, whatever our queue is.
void check_broker(const Config& cfg, std::vector<Finding>& out) {
  const auto& l = cfg.lithops;
  if (l.source.empty()) {
    return;
  }
  if (!l.amqp_url) {
    out.push_back({Finding::Level::warning, l.source + ": rabbitmq.amqp_url is not set: the Lithops client needs "
                                                       "it to reach the workers; add `amqp_url:` under `rabbitmq:`"});
  } else if (!cfg.rabbitmq.amqp_url.empty() && !same_broker(l.amqp_url->text, cfg.rabbitmq.amqp_url)) {
    out.push_back({Finding::Level::warning,
                   "the client's broker " + redact_url(l.amqp_url->text) + " (" + l.where(*l.amqp_url) +
                       ") differs from the workers' " + redact_url(cfg.rabbitmq.amqp_url) + " (" +
                       to_string(cfg.origin("rabbitmq.amqp_url")) +
                       "): tasks would wait in a queue no worker reads; keep the URL in one place (the Lithops "
                       "config) and remove the other"});
  }
  if (cfg.rabbitmq.queue != "task_queue") {
    out.push_back({Finding::Level::warning,
                   "rabbitmq.queue is '" + cfg.rabbitmq.queue + "' (" + to_string(cfg.origin("rabbitmq.queue")) +
                       ") but the Lithops client always publishes to 'task_queue'; remove rabbitmq.queue unless "
                       "another client publishes there"});
  }
}

// lithops/constants.py EXECUTION_TIMEOUT_DEFAULT = 1800. A call running
// longer than the broker's consumer_timeout is taken back by the broker
// (its acknowledgement comes only when the call ends) and run again.
void check_consumer_timeout(const Config& cfg, std::vector<Finding>& out) {
  const auto& l = cfg.lithops;
  int broker = cfg.rabbitmq.consumer_timeout;
  if (l.source.empty() || broker <= 0) {
    return;  // the broker's value is unknown: AMQP cannot ask it
  }
  double exec = 1800;
  if (l.execution_timeout) {
    char* end = nullptr;
    exec = std::strtod(l.execution_timeout->text.c_str(), &end);
    if (!end || *end != '\0' || l.execution_timeout->text.empty()) {
      return;  // Lithops itself refuses it
    }
  }
  if (exec < broker) {
    return;
  }
  out.push_back(
      {Finding::Level::warning,
       (l.execution_timeout
            ? l.where(*l.execution_timeout) + ": lithops.execution_timeout is " + l.execution_timeout->text + " s"
            : l.source + ": lithops.execution_timeout is not set (Lithops' default: 1800 s)") +
           " but the broker's consumer_timeout is " + std::to_string(broker) +
           " s (rabbitmq.consumer_timeout): a call running longer is taken back by the broker and run "
           "again, then dead-lettered; raise consumer_timeout on the broker above the longest call "
           "(lithops-hpc(1), FAILURE SEMANTICS) and set rabbitmq.consumer_timeout to match"});
}

// singularity.py invoke: worker_processes is how many calls go in one message.
void note_worker_processes(const LithopsClient& l, std::vector<Finding>& out) {
  if (!l.worker_processes) {
    return;
  }
  out.push_back({Finding::Level::note,
                 l.where(*l.worker_processes) + ": singularity.worker_processes = " + l.worker_processes->text +
                     " is, for the Lithops client, calls per message; it is not lithops-hpc's "
                     "singularity.worker_processes (task slots per node, set in lithops-hpc.toml(5)), and is not "
                     "read as such"});
}

}  // namespace

std::vector<Finding> lint_client(const Config& cfg, const ClientFacts& facts) {
  std::vector<Finding> out;
  const auto& l = cfg.lithops;
  check_found(l, out);
  check_backend(l, out);
  check_runtime(l, out);
  check_storage(l, out);
  check_python(facts, facts.image.empty() ? "(none: singularity.runtime is not set)" : facts.image, out);
  check_log_level(l, out);
  check_broker(cfg, out);
  check_consumer_timeout(cfg, out);
  note_worker_processes(l, out);
  return out;
}

std::optional<std::string> client_python_version() {
  if (!find_in_path("python3")) {
    return std::nullopt;
  }
  try {
    auto r = run_capture({.argv = {"python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"}});
    return r.ok() ? major_minor(trim(r.out)) : std::nullopt;
  } catch (const Error&) {
    return std::nullopt;
  }
}

std::optional<std::string> python_version_from_deffile(const std::string& def) {
  std::istringstream in(def);
  std::string line;
  bool in_labels = false;
  std::optional<std::string> from_image;
  while (std::getline(in, line)) {
    auto t = trim(line);
    if (starts_with(t, "%")) {
      in_labels = starts_with(t, "%labels");
      continue;
    }
    if (in_labels && starts_with(t, k_python_label)) {
      if (auto v = major_minor(trim(t.substr(std::string(k_python_label).size())))) {
        return v;
      }
    }
    auto lt = lower(t);
    if (starts_with(lt, "from:") && !from_image) {
      auto image = trim(t.substr(5));
      if (starts_with(image, "python:")) {
        from_image = major_minor(image.substr(7));
      }
    }
  }
  return from_image;
}

namespace {

std::string read_object(int fd, const sif::Descriptor& d) {
  std::string buf(static_cast<std::size_t>(std::min<std::int64_t>(d.size, k_max_metadata_bytes)), '\0');
  auto n = ::pread(fd, buf.data(), buf.size(), d.offset);
  buf.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  return buf;
}

std::optional<std::string> from_labels_json(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_object() && j.contains(k_python_label) && j[k_python_label].is_string()) {
    return major_minor(j[k_python_label].get<std::string>());
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> image_python_version(const std::string& sif_path, std::string* why) {
  sif::Image img;
  try {
    img = sif::read_image(sif_path);
  } catch (const Error& e) {
    *why = e.what();
    return std::nullopt;
  }
  UniqueFd fd(::open(sif_path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    *why = "cannot open " + sif_path + ": " + errno_text(errno);
    return std::nullopt;
  }
  for (int type : {sif::k_data_labels, sif::k_data_deffile}) {
    for (const auto& d : img.descriptors) {
      if (d.data_type != type) {
        continue;
      }
      auto text = read_object(fd.get(), d);
      auto v = type == sif::k_data_labels ? from_labels_json(text) : python_version_from_deffile(text);
      if (v) {
        return v;
      }
    }
  }
  *why = sif_path + " has no label " + std::string(k_python_label) + " and its definition file no From: python:X.Y";
  return std::nullopt;
}

}  // namespace lhpc::config
