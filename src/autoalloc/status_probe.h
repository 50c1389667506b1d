// The DeploymentProbe port (ports.h) on the deployments' own files: the
// status file rank 0 writes and the stop request `lithops-hpc stop` writes,
// both under <state dir>/jobs/<job>/ (health/status_file.h), whichever
// scheduler started the deployment.
#pragma once

#include "autoalloc/ports.h"

namespace lhpc::autoalloc {

class StatusProbe final : public DeploymentProbe {
public:
  DeploymentLook look(const std::string& job) override;
  void request_stop(const std::string& job) override;
};

}  // namespace lhpc::autoalloc
