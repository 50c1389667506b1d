// Ports for the services `up` starts: a free one, whether one is still free,
// and whether something answers there. Loopback or the bound address only.
#pragma once

#include <string>

namespace lhpc::services {

// A TCP port nothing listens on right now (the kernel's pick on `addr`).
int free_port(const std::string& addr);
// True when `port` can be bound on `addr` now.
bool port_free(const std::string& addr, int port);
// True when a TCP connect to addr:port succeeds within `timeout_ms`.
bool port_open(const std::string& addr, int port, int timeout_ms);

}  // namespace lhpc::services
