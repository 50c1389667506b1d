// Logging setup: spdlog to stderr, one pattern for every command. Ranks of a
// deployment prefix their lines with "rank N host:" so batch logs can be grepped.
#pragma once

#include <string>

namespace lhpc {

// level: trace|debug|info|warn|error|critical|off; throws Error(usage) otherwise.
void setup_logging(const std::string& level);
void set_log_prefix(const std::string& prefix);  // e.g. "rank 2 n3"

}  // namespace lhpc
