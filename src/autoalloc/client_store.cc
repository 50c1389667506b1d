#include "autoalloc/client_store.h"

#include <fmt/format.h>

#include <chrono>

#include "autoalloc/no_image.h"
#include "services/redis.h"

namespace lhpc::autoalloc {

std::optional<std::string> RedisClientStore::put(const nlohmann::json& storage, const std::string& key,
                                                 const std::string& value) {
  auto target = redis_target(storage, key);
  if (const auto* why = std::get_if<std::string>(&target)) {
    return *why;
  }
  const auto& t = std::get<RedisTarget>(target);
  if (t.db != 0) {
    return fmt::format("the client's redis db is {}: autoalloc writes to db 0 only", t.db);
  }
  auto reply = services::redis_query(t.host, t.port, t.password, {"SET", t.key, value}, std::chrono::seconds(5));
  if (reply != "OK") {
    return fmt::format("redis at {}:{} did not take key {} (refused, unreachable or a wrong password)", t.host, t.port,
                       t.key);
  }
  return std::nullopt;
}

}  // namespace lhpc::autoalloc
