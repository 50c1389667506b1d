// Settings an image carries in its labels (org.lithops-hpc.*), which
// `runtime build` writes: a GPU runtime's gpus_per_slot and gpu_vendor, so
// every deployment of the image (autoalloc's per runtime included) is a GPU
// runtime without a key or flag. Precedence: flag > key > label > default.
// Not the Lithops client checks (client_lint), which read other labels.
#pragma once

#include <map>
#include <string>

#include "config/config.h"

namespace lhpc::config {

inline constexpr const char* k_gpus_per_slot_label = "org.lithops-hpc.gpus-per-slot";
inline constexpr const char* k_gpu_vendor_label = "org.lithops-hpc.gpu-vendor";

// The labels of a definition file's %labels sections ("KEY VALUE" lines).
std::map<std::string, std::string> labels_from_deffile(const std::string& def);

// The image's labels: its SIF labels object (JSON) over its definition
// file's %labels. Empty when the image cannot be read (whoever starts it
// says why).
std::map<std::string, std::string> image_labels(const std::string& sif_path);

// singularity.gpus_per_slot and gpu_vendor from `labels` where no flag or
// key set them, with the origin "image label <image> (<label>)". Throws
// Error(config) for a label value a key would refuse, naming the image.
void apply_image_labels(Config& cfg, const std::map<std::string, std::string>& labels, const std::string& image);
// The same from the image at `sif_path` (nothing when unreadable).
void apply_image_labels(Config& cfg, const std::string& sif_path);

}  // namespace lhpc::config
