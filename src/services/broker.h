// The user's RabbitMQ broker, through the one implementation there is:
// deploy/rabbitmq-user-broker.sh (own directory, free ports kept across
// restarts, a random password in 0600 files, loopback unless TLS or --bind),
// which the test rig runs too. `up` asks it for a broker fit for Lithops on a
// cluster: no consumer_timeout (a call may run as long as the client allows),
// the script's memory and disk alarm levels.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace lhpc::services {

// The script: installed under <datadir>/deploy/, else the source tree's.
std::string broker_script();
// Where rabbitmq-server is, or nullopt: $RABBITMQ_SBIN (which must hold it
// when set), /usr/lib/rabbitmq/bin, /usr/local/lib/rabbitmq/bin, PATH.
std::optional<std::string> find_rabbitmq();

struct BrokerStart {
  std::string dir;
  std::string bind;  // --bind; empty: loopback (or every interface with TLS)
  std::string tls_cert, tls_key, tls_ca;
  std::string log;  // the script's own messages are appended here
};

// Starts it unless it runs (the script leaves a running broker alone) and
// returns the URL (with its password: for the config and the environment,
// never for a log). Throws Error with the end of the script's messages.
std::string start_broker(const BrokerStart& b);
// Stops it (the script: broker and its epmd); nothing when none ran.
void stop_broker(const std::string& dir, const std::string& log);
// True when its server pid is alive (cheap: no rabbitmqctl).
bool broker_running(const std::string& dir);
// The URL the script wrote, if any.
std::optional<std::string> broker_url(const std::string& dir);

}  // namespace lhpc::services
