#include "amqp/reconnect.h"

#include <exception>

namespace lhpc::amqp {

Reconnector::Reconnector(Options opts, Backoff backoff) : m_opts(std::move(opts)), m_backoff(backoff) {}

Reconnector::~Reconnector() {
  if (m_thread.joinable()) {
    m_thread.join();  // what it made is dropped with m_outcome: nothing was consumed through it yet
  }
}

void Reconnector::start(Setup setup) {
  if (m_thread.joinable()) {
    return;
  }
  {
    std::lock_guard<std::mutex> lock(m_mu);
    m_outcome = Outcome{};
  }
  m_thread = std::thread([this, setup = std::move(setup)] {
    Outcome out;
    try {
      out.conn = std::make_unique<Connection>(m_opts);
      if (setup) {
        out.consumer_tag = setup(*out.conn);
      }
    } catch (const std::exception& e) {
      out.conn.reset();
      out.error = e.what();
    }
    out.done = true;
    std::lock_guard<std::mutex> lock(m_mu);
    m_outcome = std::move(out);
  });
}

std::optional<Reconnector::Result> Reconnector::take() {
  if (!m_thread.joinable()) {
    return std::nullopt;
  }
  Result r;
  {
    std::lock_guard<std::mutex> lock(m_mu);
    if (!m_outcome.done) {
      return std::nullopt;
    }
    r.conn = std::move(m_outcome.conn);
    r.consumer_tag = std::move(m_outcome.consumer_tag);
    r.error = std::move(m_outcome.error);
    m_outcome = Outcome{};
  }
  m_thread.join();  // it has finished: this returns at once
  if (r.conn) {
    m_backoff.reset();
  } else {
    r.retry_in = m_backoff.next();
    m_next_attempt = Clock::now() + r.retry_in;
  }
  return r;
}

std::chrono::milliseconds Reconnector::lost(Clock::time_point now) {
  auto delay = m_backoff.next();
  m_next_attempt = now + delay;
  return delay;
}

}  // namespace lhpc::amqp
