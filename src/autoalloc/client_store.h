// The ClientStore port (ports.h) on a Lithops client's redis storage, the
// one `lithops-hpc up` sets up: the request's own storage configuration
// names the server, and whoever can publish that request can already run
// any code on the deployments, so it is trusted as a deployment trusts it.
// What Lithops' put_object sends (SADD of the parent "directories", SET),
// pipelined over services/redis's RESP client: the password goes over the
// socket only, never on a command line or into a log.
#pragma once

#include "autoalloc/ports.h"

namespace lhpc::autoalloc {

class RedisClientStore final : public ClientStore {
public:
  std::optional<std::string> put(const nlohmann::json& storage,
                                 const std::vector<std::pair<std::string, std::string>>& entries) override;
};

}  // namespace lhpc::autoalloc
