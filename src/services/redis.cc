#include "services/redis.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstdio>
#include <memory>
#include <thread>

#include "services/net.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/strings.h"

namespace lhpc::services {

namespace {

using Clock = std::chrono::steady_clock;

std::string random_hex(std::size_t bytes) {
  UniqueFd f(::open("/dev/urandom", O_RDONLY | O_CLOEXEC));
  std::string raw(bytes, '\0');
  if (!f || ::read(f.get(), raw.data(), bytes) != static_cast<ssize_t>(bytes)) {
    throw Error(Exit::failure, "cannot read /dev/urandom for a password");
  }
  static const char* k_hex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out += k_hex[c >> 4];
    out += k_hex[c & 15];
  }
  return out;
}

std::string resp_command(const std::vector<std::string>& args) {
  std::string out = "*" + std::to_string(args.size()) + "\r\n";
  for (const auto& a : args) {
    out += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
  }
  return out;
}

struct SslCtxFree {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL* s) const { SSL_free(s); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct FileClose {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

// One connection to the store: plain, or TLS to a server that shows the
// certificate in `pin` (its first PEM block), or nothing at all.
class Link {
public:
  // False when the handshake fails or the server's certificate is another one.
  bool start_tls(const std::string& pin) {
    std::unique_ptr<std::FILE, FileClose> f(std::fopen(pin.c_str(), "re"));
    std::unique_ptr<X509, X509Free> want(f ? PEM_read_X509(f.get(), nullptr, nullptr, nullptr) : nullptr);
    m_ctx.reset(SSL_CTX_new(TLS_client_method()));
    if (!want || !m_ctx) {
      return false;
    }
    SSL_CTX_set_verify(m_ctx.get(), SSL_VERIFY_NONE, nullptr);  // pinned below instead
    m_ssl.reset(SSL_new(m_ctx.get()));
    if (!m_ssl || SSL_set_fd(m_ssl.get(), m_fd) != 1 || SSL_connect(m_ssl.get()) != 1) {
      ERR_clear_error();
      return false;
    }
    std::unique_ptr<X509, X509Free> got(SSL_get1_peer_certificate(m_ssl.get()));
    return got && X509_cmp(got.get(), want.get()) == 0;
  }
  bool send_all(const std::string& data) {
    if (m_ssl) {
      return SSL_write(m_ssl.get(), data.data(), static_cast<int>(data.size())) == static_cast<int>(data.size());
    }
    return ::send(m_fd, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size());
  }
  // Bytes already decrypted wait in the TLS layer, not on the socket.
  bool pending() const { return m_ssl && SSL_pending(m_ssl.get()) > 0; }
  ssize_t read_some(char* buf, std::size_t n) {
    if (m_ssl) {
      int got = SSL_read(m_ssl.get(), buf, static_cast<int>(n));
      if (got <= 0) {
        ERR_clear_error();
      }
      return got;
    }
    return ::read(m_fd, buf, n);
  }
  void attach(int fd) { m_fd = fd; }
  int fd() const { return m_fd; }

private:
  int m_fd = -1;
  std::unique_ptr<SSL_CTX, SslCtxFree> m_ctx;
  std::unique_ptr<SSL, SslFree> m_ssl;
};

// Reads until `buf` holds one whole reply starting at `at`; returns its text
// and moves `at` past it, or nullopt for an error reply or a broken stream.
class RespReader {
public:
  RespReader(Link& link, Clock::time_point deadline) : m_link(link), m_deadline(deadline) {}
  std::optional<std::string> next() {
    auto line = read_line();
    if (!line || line->empty()) {
      return std::nullopt;
    }
    char kind = (*line)[0];
    auto rest = line->substr(1);
    if (kind == '+' || kind == ':') {
      return rest;
    }
    if (kind != '$') {
      return std::nullopt;  // '-' error, or a type we never ask for
    }
    long n = std::strtol(rest.c_str(), nullptr, 10);
    if (n < 0 || !fill(static_cast<std::size_t>(n) + 2)) {
      return std::nullopt;
    }
    auto body = m_buf.substr(0, static_cast<std::size_t>(n));
    m_buf.erase(0, static_cast<std::size_t>(n) + 2);
    return body;
  }

private:
  bool more() {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(m_deadline - Clock::now()).count();
    pollfd p{.fd = m_link.fd(), .events = POLLIN, .revents = 0};
    if (!m_link.pending() && (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) != 1)) {
      return false;
    }
    char chunk[4096];
    auto got = m_link.read_some(chunk, sizeof chunk);
    if (got <= 0) {
      return false;
    }
    m_buf.append(chunk, static_cast<std::size_t>(got));
    return true;
  }
  bool fill(std::size_t n) {
    while (m_buf.size() < n) {
      if (!more()) {
        return false;
      }
    }
    return true;
  }
  std::optional<std::string> read_line() {
    std::size_t nl;
    while ((nl = m_buf.find("\r\n")) == std::string::npos) {
      if (!more()) {
        return std::nullopt;
      }
    }
    auto line = m_buf.substr(0, nl);
    m_buf.erase(0, nl + 2);
    return line;
  }
  Link& m_link;
  Clock::time_point m_deadline;
  std::string m_buf;
};

// The redis-server of ours the pid file names, if it runs (a reused pid is
// someone else's); Error when the file is not ours alone.
std::optional<pid_t> running_redis(const std::string& dir) {
  auto pid = read_pid_file(dir + "/redis.pid", "the storage's pid file");
  if (pid && own_process_with(*pid, "redis-server")) {
    return pid;
  }
  return std::nullopt;
}

std::string log_tail(const std::string& path) {
  try {
    auto text = read_file(path);
    auto from = text.size() > 1500 ? text.size() - 1500 : 0;
    return text.substr(from);
  } catch (const Error&) {
    return "";
  }
}

// A dotted address, or the first IPv4 address of a host name (a Lithops
// config names its redis host either way).
bool ipv4_of(const std::string& host, in_addr& out) {
  if (::inet_pton(AF_INET, host.c_str(), &out) == 1) {
    return true;
  }
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || !found) {
    return false;
  }
  out = reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr;
  ::freeaddrinfo(found);
  return true;
}

}  // namespace

std::string probe_address(const std::string& bind) { return bind.empty() || bind == "0.0.0.0" ? "127.0.0.1" : bind; }

std::string redis_conf(const RedisSetup& s, const std::string& password) {
  std::string c;
  c += "# Written by lithops-hpc up on each start: edit its options, not this file.\n";
  if (s.tls.cert.empty()) {
    c += "port " + std::to_string(s.port) + "\n";
  } else {
    // TLS only, with the broker's certificate; clients show none (they
    // authenticate with the password, as on the broker).
    c += "port 0\ntls-port " + std::to_string(s.port) + "\n";
    c += "tls-cert-file " + s.tls.cert + "\ntls-key-file " + s.tls.key + "\n";
    if (!s.tls.ca.empty()) {
      c += "tls-ca-cert-file " + s.tls.ca + "\n";
    }
    c += "tls-auth-clients no\n";
  }
  c += "bind " + (s.bind.empty() ? std::string("127.0.0.1") : s.bind) + "\n";
  c += "protected-mode yes\n";
  c += "daemonize yes\n";
  c += "pidfile " + s.dir + "/redis.pid\n";
  c += "logfile " + s.dir + "/redis.log\n";
  c += "dir " + s.dir + "/data\n";
  c += "dbfilename dump.rdb\n";
  c += "save 900 1 300 100\n";
  c += "appendonly no\n";
  // Full is an error for the writer, never a silent loss of a stored result.
  c += "maxmemory " + std::to_string(s.maxmemory) + "\n";
  c += "maxmemory-policy noeviction\n";
  c += "requirepass " + password + "\n";
  return c;
}

std::string redis_password(const std::string& dir) {
  auto path = dir + "/password";
  if (auto p = read_private_file(path, 4096)) {
    return trim(*p);
  }
  auto pw = random_hex(24);
  write_file_atomic(path, pw + "\n", 0600);
  return pw;
}

std::optional<std::string> redis_query(const std::string& host, int port, const std::string& password,
                                       const std::vector<std::string>& args, std::chrono::milliseconds timeout,
                                       const std::string& tls_cert) {
  auto replies = redis_pipeline(host, port, password, {args}, timeout, tls_cert);
  return replies ? std::optional<std::string>(replies->back()) : std::nullopt;
}

std::optional<std::vector<std::string>> redis_pipeline(const std::string& host, int port, const std::string& password,
                                                       const std::vector<std::vector<std::string>>& commands,
                                                       std::chrono::milliseconds timeout, const std::string& tls_cert) {
  auto deadline = Clock::now() + timeout;
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (!s || !ipv4_of(host, a.sin_addr)) {
    return std::nullopt;
  }
  timeval tv{.tv_sec = static_cast<time_t>(timeout.count() / 1000),
             .tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(s.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  ::setsockopt(s.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);  // bounds the TLS handshake
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    return std::nullopt;
  }
  Link link;
  link.attach(s.get());
  if (!tls_cert.empty() && !link.start_tls(tls_cert)) {
    return std::nullopt;
  }
  // No password: a server without requirepass refuses AUTH.
  auto req = password.empty() ? std::string() : resp_command({"AUTH", password});
  for (const auto& c : commands) {
    req += resp_command(c);
  }
  if (commands.empty() || !link.send_all(req)) {
    return std::nullopt;
  }
  RespReader r(link, deadline);
  if (!password.empty() && !r.next()) {
    return std::nullopt;  // AUTH refused
  }
  std::vector<std::string> replies;
  for (std::size_t i = 0; i < commands.size(); ++i) {
    auto reply = r.next();
    if (!reply) {
      return std::nullopt;
    }
    replies.push_back(std::move(*reply));
  }
  return replies;
}

bool redis_alive(const std::string& dir, int port, const std::string& bind, const std::string& tls_cert) {
  auto pid = running_redis(dir);
  if (!pid) {
    return false;
  }
  auto pw = read_private_file(dir + "/password", 4096);
  return pw && redis_query(probe_address(bind), port, trim(*pw), {"PING"}, std::chrono::seconds(2), tls_cert) == "PONG";
}

void start_redis(const RedisSetup& s) {
  auto pw = redis_password(s.dir);
  make_private_dir(s.dir + "/data");
  write_file_atomic(s.dir + "/redis.conf", redis_conf(s, pw), 0600);
  ::unlink((s.dir + "/redis.pid").c_str());
  SpawnOptions o;
  o.argv = {s.server, s.dir + "/redis.conf"};
  o.cwd = s.dir;
  ScopedUmask mask(077);  // its pid file: ours alone, as read_pid_file wants it
  auto c = spawn(o);
  int st = c.wait();  // it daemonizes: the parent ends once the child is on its way
  auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline) {
    if (redis_alive(s.dir, s.port, s.bind, s.tls.cert)) {
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  throw Error(Exit::failure,
              "redis-server did not start on port " + std::to_string(s.port) + " (" + describe_status(st) +
                  "); its log " + s.dir + "/redis.log ends with:\n" + log_tail(s.dir + "/redis.log"),
              "fix what the log says, then run lithops-hpc up again");
}

bool stop_redis(const std::string& dir, std::chrono::milliseconds grace) {
  auto pid = running_redis(dir);
  if (!pid) {
    return false;
  }
  ::kill(*pid, SIGTERM);
  auto deadline = Clock::now() + grace;
  while (::kill(*pid, 0) == 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (::kill(*pid, 0) == 0) {
    ::kill(*pid, SIGKILL);
  }
  return true;
}

std::optional<std::uint64_t> redis_used_memory(const std::string& dir, int port, const std::string& bind,
                                               const std::string& tls_cert) {
  auto pw = read_private_file(dir + "/password", 4096);
  if (!pw) {
    return std::nullopt;
  }
  auto info = redis_query(probe_address(bind), port, trim(*pw), {"INFO", "memory"}, std::chrono::seconds(2), tls_cert);
  if (!info) {
    return std::nullopt;
  }
  auto at = info->find("used_memory:");
  if (at == std::string::npos) {
    return std::nullopt;
  }
  return std::strtoull(info->c_str() + at + 12, nullptr, 10);
}

}  // namespace lhpc::services
