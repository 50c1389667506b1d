// libFuzzer target: a config file's text through config::parse (toml++, the
// schema, the per-key checks), then what commands do with the result
// (placeholders expanded, `config check`'s TOML). lhpc::Error is the loader
// refusing the file, which is fine; anything else escaping is a finding.
// toml++ is compiled into this target header-only with its assertions off
// (tests/fuzz/meson.build): its findings count only when our checks let the
// input reach it.
#include <cstddef>
#include <cstdint>
#include <string>

#include "config/config.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto cfg = lhpc::config::parse(text, "fuzz.toml");
    const lhpc::config::Placeholders ph{.jobid = "123", .node = "n1", .user = "u"};
    (void)lhpc::config::to_toml(lhpc::config::expanded(cfg, ph));
    if (!cfg.rabbitmq.amqp_url.empty()) {
      (void)lhpc::config::parse_amqp_url(cfg.rabbitmq.amqp_url);
    }
  } catch (const lhpc::Error&) {
  }
  return 0;
}
