#include "util/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "util/error.h"

namespace lhpc {

namespace {
std::string g_prefix;
void apply_pattern() {
  std::string p = "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] ";
  if (!g_prefix.empty()) {
    p += g_prefix + ": ";
  }
  spdlog::set_pattern(p + "%v");
}
}  // namespace

void setup_logging(const std::string& level) {
  static bool made = false;
  if (!made) {
    auto logger = spdlog::stderr_color_mt("lithops-hpc");
    spdlog::set_default_logger(logger);
    made = true;
  }
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    throw Error(Exit::usage, "unknown log level '" + level + "'",
                "use one of trace, debug, info, warn, error, critical, off");
  }
  spdlog::set_level(lvl);
  apply_pattern();
}

void set_log_prefix(const std::string& prefix) {
  g_prefix = prefix;
  apply_pattern();
}

}  // namespace lhpc
