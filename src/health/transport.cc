#include "health/transport.h"

#include <spdlog/spdlog.h>

#include <cstring>

namespace lhpc::health {

namespace {

std::string mpi_error_text(int code) {
  char buf[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, static_cast<std::size_t>(len));
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

}  // namespace

Transport::Transport(MPI_Comm comm) : m_comm(comm) {
  MPI_Comm_rank(m_comm, &m_rank);
  MPI_Comm_size(m_comm, &m_size);
}

Transport::~Transport() {
  if (mpi_finalized()) {
    return;
  }
  for (auto it = m_out.begin(); it != m_out.end();) {
    int done = 0;
    MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
    if (done) {
      it = m_out.erase(it);
      continue;
    }
    // A peer that never receives (stopped, gone) leaves the send active:
    // release the request and let its small buffer leak rather than free
    // memory MPI may still read.
    MPI_Request_free(&it->request);
    static auto* graveyard = new std::list<Outgoing>();  // never freed, on purpose
    auto next = std::next(it);
    graveyard->splice(graveyard->end(), m_out, it);  // the node, and its address, stay
    it = next;
  }
}

void Transport::progress() {
  for (auto it = m_out.begin(); it != m_out.end();) {
    int done = 0;
    int rc = MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      spdlog::warn("health: MPI_Test failed: {}", mpi_error_text(rc));
      done = 1;  // the request is dead either way
    }
    if (!done) {
      ++it;
      continue;
    }
    if (&*it == m_report_in_flight) {
      m_report_in_flight = nullptr;
    }
    it = m_out.erase(it);
  }
  if (!m_report_in_flight && m_kept) {
    Report r = *m_kept;
    m_kept.reset();
    start_report(r);
  }
}

bool Transport::start_report(const Report& r) {
  auto& o = m_out.emplace_back();
  o.report = r;
  int rc = MPI_Isend(&o.report, sizeof(Report), MPI_BYTE, 0, k_report_tag, m_comm, &o.request);
  if (rc != MPI_SUCCESS) {
    if (!m_warned_send) {
      spdlog::warn("health: cannot send the report to rank 0: {}", mpi_error_text(rc));
      m_warned_send = true;
    }
    m_out.pop_back();
    return false;
  }
  m_report_in_flight = &o;
  return true;
}

bool Transport::send(const Report& r) {
  if (is_root()) {
    return false;  // rank 0 puts its own report into the table directly
  }
  progress();
  if (m_report_in_flight) {
    m_kept = r;  // the newest is what matters; an older kept one is dropped
    return false;
  }
  m_kept.reset();
  return start_report(r);
}

std::vector<Command> Transport::poll_control() {
  progress();
  std::vector<Command> out;
  if (is_root()) {
    return out;
  }
  while (true) {
    int flag = 0;
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    if (MPI_Improbe(0, k_control_tag, m_comm, &flag, &msg, &st) != MPI_SUCCESS || !flag) {
      break;
    }
    int bytes = 0;
    MPI_Get_count(&st, MPI_BYTE, &bytes);
    std::vector<char> buf(static_cast<std::size_t>(bytes > 0 ? bytes : 1));
    MPI_Mrecv(buf.data(), bytes, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    Control c;
    if (bytes != static_cast<int>(sizeof(Control))) {
      spdlog::warn("health: dropped a control message of {} bytes (expected {})", bytes, sizeof(Control));
      continue;
    }
    std::memcpy(&c, buf.data(), sizeof c);
    if (c.version != k_report_version) {
      spdlog::warn("health: dropped a control message of version {} (expected {})", c.version, k_report_version);
      continue;
    }
    out.push_back(c.command);
  }
  return out;
}

std::vector<Report> Transport::poll(std::size_t max) {
  progress();
  std::vector<Report> out;
  if (!is_root()) {
    return out;
  }
  if (max == 0) {
    max = 4 * static_cast<std::size_t>(m_size) + 16;
  }
  for (std::size_t n = 0; n < max; ++n) {
    int flag = 0;
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    if (MPI_Improbe(MPI_ANY_SOURCE, k_report_tag, m_comm, &flag, &msg, &st) != MPI_SUCCESS || !flag) {
      break;
    }
    int bytes = 0;
    MPI_Get_count(&st, MPI_BYTE, &bytes);
    if (bytes != static_cast<int>(sizeof(Report))) {
      std::vector<char> junk(static_cast<std::size_t>(bytes > 0 ? bytes : 1));
      MPI_Mrecv(junk.data(), bytes, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
      spdlog::warn("health: dropped a report of {} bytes from rank {} (expected {}: a different lithops-hpc build?)",
                   bytes, st.MPI_SOURCE, sizeof(Report));
      continue;
    }
    Report r;
    MPI_Mrecv(&r, sizeof(Report), MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    if (!valid(r) || r.rank != st.MPI_SOURCE) {
      spdlog::warn("health: dropped a malformed report from rank {} (version {}, rank field {})", st.MPI_SOURCE,
                   r.version, r.rank);
      continue;
    }
    out.push_back(r);
  }
  return out;
}

void Transport::broadcast_control(Command c) {
  if (!is_root()) {
    return;
  }
  progress();
  ++m_control_seq;
  for (int dest = 1; dest < m_size; ++dest) {
    auto& o = m_out.emplace_back();
    o.control = Control{.command = c, .seq = m_control_seq};
    int rc = MPI_Isend(&o.control, sizeof(Control), MPI_BYTE, dest, k_control_tag, m_comm, &o.request);
    if (rc != MPI_SUCCESS) {
      spdlog::warn("health: cannot send '{}' to rank {}: {}", k_command_names.text(c), dest, mpi_error_text(rc));
      m_out.pop_back();
    }
  }
}

bool Transport::idle() const noexcept { return m_out.empty() && !m_kept; }

}  // namespace lhpc::health
