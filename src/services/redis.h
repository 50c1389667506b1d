// The user's Redis for Lithops' storage (Debian's redis-server), run as the
// user: its own directory (0700) with a 0600 redis.conf holding the password
// (never on a command line), the pid file, the log and the data. Loopback
// only unless bound elsewhere, `maxmemory` with `noeviction`: a full store
// refuses writes with an error rather than drop a result Lithops still needs.
// With TLS (when the broker has it) it speaks TLS only (`port 0`, `tls-port`)
// with the broker's certificate. Also the few RESP exchanges lithops-hpc
// needs (PING, INFO memory) over a socket of its own, so no password goes
// through redis-cli's command line; over TLS they talk only to a server that
// shows that very certificate (pinned: no name or CA to get wrong on loopback).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lhpc::services {

// The store's TLS: the broker's certificate, key and CA (absolute PEM
// paths); no cert: plain RESP.
struct RedisTls {
  std::string cert, key, ca;
};

struct RedisSetup {
  std::string dir;
  std::string server;  // redis-server
  std::string bind;    // empty: 127.0.0.1
  int port = 0;
  std::uint64_t maxmemory = 0;  // bytes
  RedisTls tls;                 // clients need TLS on `port`; they show no certificate (the password stays)
};

// redis.conf for `s` (pure, for tests): the password goes in `requirepass`.
std::string redis_conf(const RedisSetup& s, const std::string& password);

// <dir>/password, made (random, 0600) when missing.
std::string redis_password(const std::string& dir);
// Running: the pid in <dir>/redis.pid is a redis-server and answers PING
// with the password on `port` (over TLS when `tls_cert` is set).
bool redis_alive(const std::string& dir, int port, const std::string& bind, const std::string& tls_cert = {});
// Writes the config and starts the server (it daemonizes); waits until it
// answers. Throws Error with the end of its log when it does not.
void start_redis(const RedisSetup& s);
// SIGTERM (it saves its data when configured to), SIGKILL after `grace`;
// true when one was running.
bool stop_redis(const std::string& dir, std::chrono::milliseconds grace);
// INFO memory's used_memory, nullopt when it does not answer.
std::optional<std::uint64_t> redis_used_memory(const std::string& dir, int port, const std::string& bind,
                                               const std::string& tls_cert = {});

// One request after AUTH (none with an empty password); the reply's text (a
// status or bulk string), or nullopt on any failure (refused, timeout, error
// reply). `host`: an IPv4 address or a host name. With `tls_cert` over TLS,
// and only when the server's certificate is that file's (the password is
// sent to no one else).
std::optional<std::string> redis_query(const std::string& host, int port, const std::string& password,
                                       const std::vector<std::string>& args, std::chrono::milliseconds timeout,
                                       const std::string& tls_cert = {});

// Several requests after one AUTH, sent at once; every reply, or nullopt
// when one failed (as redis_query).
std::optional<std::vector<std::string>> redis_pipeline(const std::string& host, int port, const std::string& password,
                                                       const std::vector<std::vector<std::string>>& commands,
                                                       std::chrono::milliseconds timeout,
                                                       const std::string& tls_cert = {});

// The address to knock on for a server bound to `bind` (loopback for "" and 0.0.0.0).
std::string probe_address(const std::string& bind);

}  // namespace lhpc::services
