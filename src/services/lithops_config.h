// Writing `up`'s connection settings into the user's Lithops config: the
// file Lithops would read (config::find_lithops_config; the system-wide
// /etc/lithops/config is not the user's, so ~/.lithops/config is written
// then, which Lithops reads first), created 0600 when missing, its other keys
// and comments kept (config/lithops_yaml_edit.h), the previous file kept as
// <file>.bak. Unchanged settings leave the file alone.
#pragma once

#include <string>
#include <vector>

#include "config/lithops_yaml_edit.h"

namespace lhpc::services {

// The file `up` writes.
std::string lithops_config_target();

struct ConfigWrite {
  std::string path;
  std::string backup;  // empty: no previous file, or nothing changed
  bool changed = false;
  bool comments_lost = false;
};

// Throws Error(config) when the file cannot be read, parsed or written,
// naming it and what to do.
ConfigWrite write_lithops_config(const std::string& path, const std::vector<config::YamlSet>& sets);

}  // namespace lhpc::services
