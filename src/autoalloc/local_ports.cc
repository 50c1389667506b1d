#include "autoalloc/local_ports.h"

#include "autoalloc/broker_probe.h"
#include "autoalloc/client_store.h"
#include "autoalloc/local_scheduler.h"
#include "autoalloc/status_probe.h"

namespace lhpc::autoalloc {

Ports local_ports(const Settings& s, const std::string& self) {
  Ports p;
  LocalOptions o;
  o.self = self;
  o.records = controller_dir() + "/local";
  o.launcher_args = s.sbatch_args;
  p.scheduler = std::make_unique<LocalScheduler>(std::move(o));
  p.queue = std::make_unique<BrokerProbe>(s.broker, s.queue);
  p.deployments = std::make_unique<StatusProbe>();
  p.store = std::make_unique<RedisClientStore>();
  return p;
}

}  // namespace lhpc::autoalloc
