#include "config/image_labels.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "sif/sif.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/strings.h"

namespace lhpc::config {

namespace {

constexpr std::int64_t k_max_object_bytes = 1 << 20;

std::string read_object(int fd, const sif::Descriptor& d) {
  std::string buf(static_cast<std::size_t>(std::min<std::int64_t>(d.size, k_max_object_bytes)), '\0');
  auto n = ::pread(fd, buf.data(), buf.size(), d.offset);
  buf.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  return buf;
}

void labels_from_json(const std::string& text, std::map<std::string, std::string>& out) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_object()) {
    return;
  }
  for (const auto& [k, v] : j.items()) {
    if (v.is_string()) {
      out[k] = v.get<std::string>();
    }
  }
}

std::optional<int> whole_number(const std::string& s) {
  int n = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) {
    return std::nullopt;
  }
  return n;
}

bool is_default(const Config& cfg, const std::string& key) { return cfg.origin(key).from == From::default_value; }

}  // namespace

std::map<std::string, std::string> labels_from_deffile(const std::string& def) {
  std::map<std::string, std::string> labels;
  std::istringstream in(def);
  bool in_labels = false;
  for (std::string line; std::getline(in, line);) {
    auto t = trim(line);
    if (starts_with(t, "%")) {
      in_labels = t == "%labels" || starts_with(t, "%labels ") || starts_with(t, "%labels\t");
      continue;
    }
    if (!in_labels || t.empty() || starts_with(t, "#")) {
      continue;
    }
    auto space = t.find_first_of(" \t");
    labels[t.substr(0, space)] = space == std::string::npos ? "" : trim(t.substr(space));
  }
  return labels;
}

std::map<std::string, std::string> image_labels(const std::string& sif_path) {
  std::map<std::string, std::string> labels;
  sif::Image img;
  try {
    img = sif::read_image(sif_path);
  } catch (const Error&) {
    return labels;
  }
  UniqueFd fd(::open(sif_path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    return labels;
  }
  // The definition file first: the SIF's labels object (what the build made of it) wins.
  for (int type : {sif::k_data_deffile, sif::k_data_labels}) {
    for (const auto& d : img.descriptors) {
      if (d.data_type != type) {
        continue;
      }
      auto text = read_object(fd.get(), d);
      if (type == sif::k_data_deffile) {
        labels.merge(labels_from_deffile(text));
      } else {
        std::map<std::string, std::string> json;
        labels_from_json(text, json);
        json.merge(labels);
        labels = std::move(json);
      }
    }
  }
  return labels;
}

void apply_image_labels(Config& cfg, const std::map<std::string, std::string>& labels, const std::string& image) {
  auto bad = [&](const std::string& label, const std::string& value, const std::string& want) {
    return Error(Exit::config, "image " + image + ": label " + label + " is '" + value + "', not " + want,
                 "rebuild the image with lithops-hpc runtime build --gpus-per-slot N --gpu-vendor VENDOR, or set "
                 "the key in [singularity]");
  };
  if (auto it = labels.find(k_gpus_per_slot_label);
      it != labels.end() && is_default(cfg, "singularity.gpus_per_slot")) {
    auto n = whole_number(it->second);
    if (!n || *n < 0 || *n > 64) {
      throw bad(it->first, it->second, "a whole number from 0 to 64");
    }
    cfg.singularity.gpus_per_slot = static_cast<int>(*n);
    cfg.origins["singularity.gpus_per_slot"] = {From::image_label, image + " (" + it->first + ")"};
  }
  if (auto it = labels.find(k_gpu_vendor_label); it != labels.end() && is_default(cfg, "singularity.gpu_vendor")) {
    auto v = k_gpu_vendor_names.parse(it->second);
    if (!v) {
      throw bad(it->first, it->second, "one of " + k_gpu_vendor_names.list());
    }
    cfg.singularity.gpu_vendor = *v;
    cfg.origins["singularity.gpu_vendor"] = {From::image_label, image + " (" + it->first + ")"};
  }
}

void apply_image_labels(Config& cfg, const std::string& sif_path) {
  apply_image_labels(cfg, image_labels(sif_path), sif_path);
}

}  // namespace lhpc::config
