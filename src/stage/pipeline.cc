#include "stage/pipeline.h"

#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "lhpc_build_config.h"
#include "stage/agreement.h"
#include "stage/hash.h"
#include "stage/layout.h"
#include "util/error.h"
#include "util/mpi.h"

namespace lhpc::stage {

namespace {

using Clock = std::chrono::steady_clock;

void write_all(int fd, const char* p, std::size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error(Exit::stage, "cannot write " + path + ": " + errno_text(errno),
                  errno == ENOSPC ? "free space there or choose another sif_path" : "");
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

std::size_t read_full(int fd, char* p, std::size_t n, std::uint64_t off, const std::string& path) {
  std::size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, p + got, n - got, static_cast<off_t>(off + got));
    if (r < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error(Exit::image, "cannot read " + path + ": " + errno_text(errno));
    }
    if (r == 0) {
      break;
    }
    got += static_cast<std::size_t>(r);
  }
  return got;
}

#if LHPC_TEST_HOOKS
int throttle_ms() {
  // Test-only (see stage.h): slows each chunk so a test can interrupt a transfer.
  const char* t = std::getenv("LITHOPS_HPC_STAGE_THROTTLE_MS");
  return t != nullptr ? std::atoi(t) : 0;
}

bool dies_in_stage(int transfer_rank) {
  // Test-only (see stage.h): this rank crashes after its first chunk.
  const char* r = std::getenv("LITHOPS_HPC_TEST_DIE_IN_STAGE");
  return r != nullptr && *r != '\0' && std::atoi(r) == transfer_rank;
}
#else
int throttle_ms() { return 0; }
bool dies_in_stage(int) { return false; }
#endif

int world_rank_of(MPI_Comm x, int r) {
  if (r < 0) {
    return -1;
  }
  MPI_Group g = MPI_GROUP_NULL;
  MPI_Group w = MPI_GROUP_NULL;
  MPI_Comm_group(x, &g);
  MPI_Comm_group(MPI_COMM_WORLD, &w);
  int out = -1;
  MPI_Group_translate_ranks(g, 1, &r, w, &out);
  MPI_Group_free(&g);
  MPI_Group_free(&w);
  return out;
}

// One rank's part of the chain: its slots, requests and the agreement window.
class Chain {
public:
  Chain(MPI_Comm x, const ChainEnds& ends, std::uint64_t size, std::size_t chunk, double stall_timeout,
        std::function<void()> tick);
  Transfer run(Progress* progress);

private:
  static constexpr std::uint64_t k_slots = 4;  // one written, one being forwarded, two arriving
  enum class Whom { prev, next, everyone };

  int len(std::uint64_t i) const { return static_cast<int>(chunk_length(m_size, m_chunk, i)); }
  void poke();
  void wait(MPI_Request& r, Whom whom);
  std::string describe(Whom whom) const;
  void note(const Error& e);
  void post_recv(std::uint64_t j);
  void read_chunk(std::uint64_t i, char* buf);
  void write_chunk(std::uint64_t i, const char* buf);
  void finish_chunk(std::uint64_t i);
  void drain();

  MPI_Comm m_x;
  const ChainEnds& m_ends;
  std::uint64_t m_size;
  std::size_t m_chunk;
  double m_stall_timeout;
  std::function<void()> m_tick;
  int m_rank = 0;
  int m_prev = -1;
  int m_next = -1;
  bool m_root = false;
  std::uint64_t m_n = 0;
  std::uint64_t m_window = 0;
  int m_throttle = 0;
  std::vector<std::unique_ptr<char[]>> m_slot;
  std::vector<MPI_Request> m_recv;
  std::vector<MPI_Request> m_send;
  std::vector<MPI_Request> m_agree;
  std::vector<int> m_mine;
  std::vector<int> m_any;
  Hasher m_hasher;
  Transfer m_t;
};

Chain::Chain(MPI_Comm x, const ChainEnds& ends, std::uint64_t size, std::size_t chunk, double stall_timeout,
             std::function<void()> tick)
    : m_x(x), m_ends(ends), m_size(size), m_chunk(chunk), m_stall_timeout(stall_timeout), m_tick(std::move(tick)) {
  int xn = 1;
  MPI_Comm_rank(x, &m_rank);
  MPI_Comm_size(x, &xn);
  m_root = m_rank == 0;
  m_prev = m_rank - 1;
  m_next = m_rank + 1 < xn ? m_rank + 1 : -1;
  m_n = chunk_count(size, chunk);
  m_window = 2 * static_cast<std::uint64_t>(xn) + 8;
  m_throttle = throttle_ms();
  for (std::uint64_t s = 0; s < k_slots; ++s) {
    m_slot.push_back(std::make_unique_for_overwrite<char[]>(chunk));
  }
  m_recv.assign(k_slots, MPI_REQUEST_NULL);
  m_send.assign(k_slots, MPI_REQUEST_NULL);
  m_agree.assign(m_window, MPI_REQUEST_NULL);
  m_mine.assign(m_window, 0);
  m_any.assign(m_window, 0);
}

// Open MPI moves messages only inside MPI calls: test everything pending.
void Chain::poke() {
  int flag = 0;
  for (auto* reqs : {&m_recv, &m_send}) {
    for (auto& r : *reqs) {
      if (r != MPI_REQUEST_NULL) {
        MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
      }
    }
  }
}

std::string Chain::describe(Whom whom) const {
  switch (whom) {
    case Whom::prev: return fmt::format("a chunk from rank {} (the node before this one)", world_rank_of(m_x, m_prev));
    case Whom::next:
      return fmt::format("rank {} (the node after this one) to take a chunk", world_rank_of(m_x, m_next));
    case Whom::everyone: break;
  }
  return "every node's word on a chunk";
}

// Waiting yields the CPU between tests, and naps once a wait gets long.
// Yielding keeps a waiter runnable, so it picks up the next chunk without
// a scheduler round trip (on a busy machine a nap from the start made the
// transfer 3x slower); napping after 2 ms stops a rank that waits on a slow
// neighbour from taking the CPU the writers need (more ranks than cores).
void Chain::wait(MPI_Request& r, Whom whom) {
  const auto stall = std::chrono::duration<double>(m_stall_timeout);
  int flag = 0;
  const auto since = Clock::now();
  while (r != MPI_REQUEST_NULL) {
    MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
    if (flag) {
      continue;
    }
    poke();
    const auto waited = Clock::now() - since;
    if (waited < std::chrono::milliseconds(2)) {
      sched_yield();
      continue;
    }
    if (m_stall_timeout > 0 && waited > stall) {
      abandon_stalled(m_ends.out_fd >= 0 ? m_ends.out_path : std::string(), describe(whom), m_stall_timeout);
    }
    if (m_tick) {
      m_tick();
    }
    timespec nap{0, 100'000};
    ::nanosleep(&nap, nullptr);
  }
}

void Chain::note(const Error& e) {
  if (m_t.going()) {
    m_t.error = e;
  }
}

void Chain::post_recv(std::uint64_t j) {
  MPI_Irecv(m_slot[j % k_slots].get(), len(j), MPI_BYTE, m_prev, 0, m_x, &m_recv[j % k_slots]);
}

// Rank 0: read and hash slice by slice, each slice while it is still in cache.
void Chain::read_chunk(std::uint64_t i, char* buf) {
  const auto n_i = static_cast<std::size_t>(len(i));
  try {
    for (std::size_t off = 0; off < n_i; off += k_slice) {
      const auto m = std::min(k_slice, n_i - off);
      if (read_full(m_ends.src_fd, buf + off, m, i * m_chunk + off, m_ends.src_path) != m) {
        throw Error(Exit::image, m_ends.src_path + " shrank while it was being staged",
                    "stage it again once whatever writes it has finished");
      }
      m_hasher.update(buf + off, m);
    }
  } catch (const Error& e) {
    note(e);  // the chunk still goes out: the others stop with us, W chunks on
  }
}

void Chain::write_chunk(std::uint64_t i, const char* buf) {
  const auto n_i = static_cast<std::size_t>(len(i));
  const int out = m_ends.out_fd;
  try {
    for (std::size_t off = 0; off < n_i; off += k_slice) {
      const auto m = std::min(k_slice, n_i - off);
      if (!m_root) {
        m_hasher.update(buf + off, m);  // right before writing it: one trip from memory
      }
      if (out >= 0) {
        write_all(out, buf + off, m, m_ends.out_path);
      }
      poke();
    }
  } catch (const Error& e) {
    note(e);  // keep forwarding: the ranks after us must not wait for nothing
  }
  for (int ms = 0; ms < m_throttle && out >= 0; ++ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    poke();
    if (m_tick) {
      m_tick();
    }
  }
}

// After chunk i: a signal becomes this rank's state, the freed slot gets the
// next receive, and the state goes into chunk i's agreement.
void Chain::finish_chunk(std::uint64_t i) {
  if (auto sig = signal_exit(); sig && m_t.going()) {
    m_t.error = Error(*sig, "interrupted by " + signal_name(*sig));
  }
  if (!m_root && i + k_slots - 1 < m_n) {
    const auto j = i + k_slots - 1;  // into the slot chunk i-1 used
    wait(m_send[j % k_slots], Whom::next);
    post_recv(j);
  }
  const auto a = i % m_window;
  m_mine[a] = m_t.error ? 1 : 0;
  MPI_Iallreduce(&m_mine[a], &m_any[a], 1, MPI_INT, MPI_MAX, m_x, &m_agree[a]);
}

void Chain::drain() {
  // Receives posted for chunks nobody will send (an early stop).
  for (auto& r : m_recv) {
    if (r != MPI_REQUEST_NULL) {
      MPI_Cancel(&r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
    }
  }
  for (auto& r : m_send) {
    wait(r, Whom::next);
  }
  for (auto& r : m_agree) {
    wait(r, Whom::everyone);
  }
}

Transfer Chain::run(Progress* progress) {
  if (!m_root) {
    for (std::uint64_t j = 0; j < std::min(m_n, k_slots - 1); ++j) {
      post_recv(j);
    }
  }
  std::uint64_t stop_at = m_n;
  std::uint64_t done_bytes = 0;
  for (std::uint64_t i = 0; i < m_n; ++i) {
    if (i >= m_window) {
      const auto a = (i - m_window) % m_window;
      wait(m_agree[a], Whom::everyone);
      if (m_any[a] != 0) {
        stop_at = i;
        break;
      }
    }
    const auto s = i % k_slots;
    char* buf = m_slot[s].get();
    if (m_root) {
      wait(m_send[s], Whom::next);  // chunk i-4 has left: the slot is free
      if (m_t.going()) {
        read_chunk(i, buf);
      }
    } else {
      wait(m_recv[s], Whom::prev);
      if (i == 0 && dies_in_stage(m_rank)) {
        std::_Exit(1);  // exit-codes: a test hook's simulated crash
      }
    }
    if (m_next >= 0) {
      MPI_Isend(buf, len(i), MPI_BYTE, m_next, 0, m_x, &m_send[s]);
    }
    if (m_t.going() && (m_ends.out_fd >= 0 || !m_root)) {
      write_chunk(i, buf);
    }
    finish_chunk(i);
    if (m_tick) {
      m_tick();
    }
    done_bytes += static_cast<std::uint64_t>(len(i));
    if (progress != nullptr) {
      progress->update(done_bytes);
    }
  }
  drain();
  if (stop_at < m_n) {
    if (m_root) {
      spdlog::debug("stage: every rank stopped before chunk {} of {}", stop_at, m_n);
    }
    m_t.stopped = m_t.going();  // another rank failed; that rank names the reason
  }
  m_t.hash = m_hasher.hex();
  return m_t;
}

}  // namespace

Transfer broadcast_file(MPI_Comm x, const ChainEnds& ends, std::uint64_t size, std::size_t chunk, double stall_timeout,
                        Progress* progress, const std::function<void()>& tick) {
  Chain chain(x, ends, size, chunk, stall_timeout, tick);
  return chain.run(progress);
}

// The rank it waits for is gone or hangs, and every other rank of the job
// waits in a collective too. Nothing this rank wrote may stay behind. The
// other survivors reach their own deadlines a few chunks later and remove
// their files too: they get min(10 s, stall_timeout) before MPI_Abort ends them all.
void abandon_stalled(const std::string& partial, const std::string& what, double seconds) {
  if (!partial.empty()) {
    ::unlink(partial.c_str());
  }
  spdlog::error(
      "stage: waited {:g} s for {}: a rank died or hangs (the launcher's output names it); removed this "
      "node's partial copy, ending the job",
      seconds, what);
  spdlog::error("hint: a slow file system or network needs a longer deploy.start_timeout");
  spdlog::default_logger()->flush();
  std::this_thread::sleep_for(std::chrono::duration<double>(std::min(10.0, seconds)));
  MpiSession::abort(Exit::stage);
}

}  // namespace lhpc::stage
