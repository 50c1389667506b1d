#include "autoalloc/slurm_ports.h"

#include "autoalloc/broker_probe.h"
#include "autoalloc/client_store.h"
#include "autoalloc/slurm_scheduler.h"
#include "autoalloc/status_probe.h"

namespace lhpc::autoalloc {

Ports slurm_ports(const Settings& s) {
  Ports p;
  p.scheduler = std::make_unique<SlurmScheduler>(SlurmOptions{s.script, s.time_limit, s.sbatch_args, s.gpu_request});
  p.queue = std::make_unique<BrokerProbe>(s.broker, s.queue);
  p.deployments = std::make_unique<StatusProbe>();
  p.store = std::make_unique<RedisClientStore>();
  return p;
}

}  // namespace lhpc::autoalloc
