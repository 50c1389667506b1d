#include "services/net.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>

#include "util/error.h"
#include "util/fd.h"

namespace lhpc::services {

namespace {

sockaddr_in address(const std::string& addr, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (addr.empty() || ::inet_pton(AF_INET, addr.c_str(), &a.sin_addr) != 1) {
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  }
  return a;
}

}  // namespace

int free_port(const std::string& addr) {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto a = address(addr, 0);
  socklen_t len = sizeof a;
  if (!s || ::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    throw Error(Exit::failure, "cannot find a free TCP port on " + (addr.empty() ? "127.0.0.1" : addr));
  }
  return ntohs(a.sin_port);
}

bool port_free(const std::string& addr, int port) {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  auto a = address(addr, port);
  return s && ::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
}

bool port_open(const std::string& addr, int port, int timeout_ms) {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  auto a = address(addr, port);
  if (!s) {
    return false;
  }
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    return true;
  }
  if (errno != EINPROGRESS) {
    return false;
  }
  pollfd p{.fd = s.get(), .events = POLLOUT, .revents = 0};
  if (::poll(&p, 1, timeout_ms) != 1) {
    return false;
  }
  int err = 0;
  socklen_t len = sizeof err;
  ::getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  return err == 0;
}

}  // namespace lhpc::services
