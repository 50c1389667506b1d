#include "autoalloc/client_store.h"

#include <fmt/format.h>

#include <chrono>

#include "autoalloc/no_image.h"
#include "services/redis.h"
#include "util/strings.h"

namespace lhpc::autoalloc {

std::optional<std::string> RedisClientStore::put(const nlohmann::json& storage,
                                                 const std::vector<std::pair<std::string, std::string>>& entries) {
  auto target = redis_target(storage);
  if (const auto* why = std::get_if<std::string>(&target)) {
    return *why;
  }
  const auto& t = std::get<RedisTarget>(target);
  if (t.db != 0) {
    return fmt::format("the client's redis db is {}: autoalloc writes to db 0 only", t.db);
  }
  std::vector<std::vector<std::string>> commands;
  for (const auto& [key, value] : entries) {
    auto c = redis_put_commands(t.bucket, key, value);
    commands.insert(commands.end(), c.begin(), c.end());
  }
  auto replies = services::redis_pipeline(t.host, t.port, t.password, commands, std::chrono::seconds(5), t.tls_cert);
  bool written = replies.has_value();
  for (std::size_t i = 0; written && i < commands.size(); ++i) {
    written = commands[i][0] != "SET" || (*replies)[i] == "OK";
  }
  if (!written) {
    return fmt::format("redis at {}:{} did not take {} key(s) under '{}/' (refused, unreachable or a wrong password)",
                       bounded_for_log(t.host, 100), t.port, entries.size(), bounded_for_log(t.bucket, 100));
  }
  return std::nullopt;
}

}  // namespace lhpc::autoalloc
