// The collective choreography of stage (see stage.h). Every phase is local
// work that cannot throw past its try block, then an agreement on the whole
// communicator; the decisions that follow are computed by every rank from
// the same gathered data, so all ranks take the same branch.
#include "stage/stage.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "sif/sif.h"
#include "stage/hash.h"
#include "stage/layout.h"
#include "stage/progress.h"
#include "stage/record.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/mpi.h"
#include "util/process.h"
#include "util/signals.h"
#include "util/strings.h"

namespace lhpc::stage {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// Chunks are read, hashed and written in slices that fit a core's L2 cache
// (each byte crosses the memory bus once for hash and write together), and
// the MPI progress engine is poked between slices: Open MPI moves messages
// forward only inside MPI calls.
constexpr std::size_t k_slice = std::size_t{256} << 10;
constexpr std::size_t k_min_chunk = std::size_t{1} << 20;
constexpr std::size_t k_max_chunk = std::size_t{1} << 30;

int signal_code() {
  int s = SignalPipe::last_terminating();
  return s != 0 ? exit_code_for_signal(s) : 0;
}

bool is_signal_code(int code) {
  return code == static_cast<int>(Exit::interrupted) || code == static_cast<int>(Exit::terminated);
}

std::string signal_name(int code) { return code == static_cast<int>(Exit::interrupted) ? "SIGINT" : "SIGTERM"; }

// ---------------------------------------------------------------- agreements

// A rank's outcome of one phase: code 0 and any data, or a failure.
json ok(json data = json::object()) {
  data["code"] = 0;
  return data;
}
json fail(int code, const std::string& msg, const std::string& hint = {}) {
  return json{{"code", code}, {"msg", msg}, {"hint", hint}};
}
json fail(Exit code, const std::string& msg, const std::string& hint = {}) {
  return fail(static_cast<int>(code), msg, hint);
}

// Runs local work; whatever it throws becomes this rank's failure. A signal
// that arrived meanwhile wins: it is what the user asked for.
// `interruptible`: a signal turns success into "interrupted"; cleanup is not,
// since it runs after a signal-initiated drain on purpose.
json attempt(const std::function<json()>& work, bool interruptible = true) {
  json out;
  try {
    out = work();
  } catch (const Error& e) {
    out = fail(e.code(), e.what(), e.hint());
  } catch (const std::exception& e) {
    out = fail(Exit::failure, std::string("internal error: ") + e.what());
  }
  if (int sig = signal_code(); interruptible && sig != 0 && out.value("code", 0) == 0) {
    out = fail(sig, "interrupted by " + signal_name(sig));
  }
  return out;
}

json bcast_json(MPI_Comm comm, int root, const json& j) {
  int me = 0;
  MPI_Comm_rank(comm, &me);
  std::string s = me == root ? j.dump() : std::string();
  unsigned long long n = s.size();
  MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG_LONG, root, comm);
  s.resize(static_cast<std::size_t>(n));
  MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, root, comm);
  return json::parse(s);
}

std::vector<json> gather_all(MPI_Comm comm, const json& mine) {
  std::vector<json> out;
  for (const auto& s : allgather_strings(comm, mine.dump())) {
    out.push_back(json::parse(s));
  }
  return out;
}

struct World {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  NodeMap map;
  int node = 0;
  bool leader = true;
  std::string where(int r) const {
    return "node " + map.names[static_cast<std::size_t>(map.node_of_rank[static_cast<std::size_t>(r)])] +
           " (rank " + std::to_string(r) + ")";
  }
};

// The same verdict on every rank from everyone's outcome: signals first
// (SIGTERM over SIGINT), else the lowest failing rank's code, with every
// failing node named.
void throw_if_failed(const World& w, const std::vector<json>& all, const std::string& what) {
  int sig = 0;
  int sig_rank = -1;
  std::vector<int> failed;
  for (int r = 0; r < w.size; ++r) {
    int code = all[static_cast<std::size_t>(r)].value("code", 0);
    if (is_signal_code(code)) {
      if (code > sig) {
        sig = code;
        sig_rank = r;
      }
    } else if (code != 0) {
      failed.push_back(r);
    }
  }
  if (sig != 0) {
    throw Error(static_cast<Exit>(sig),
                what + " interrupted by " + signal_name(sig) + " on " + w.where(sig_rank) +
                    ": stopped on every rank, partial copies removed");
  }
  if (failed.empty()) {
    return;
  }
  const auto& first = all[static_cast<std::size_t>(failed.front())];
  std::string msg;
  if (failed.size() == 1) {
    msg = what + " failed on " + w.where(failed.front()) + ": " + first.value("msg", "");
  } else {
    msg = what + " failed on " + std::to_string(failed.size()) + " ranks: ";
    std::size_t shown = 0;
    for (int r : failed) {
      if (shown == 4) {
        msg += "; and " + std::to_string(failed.size() - shown) + " more";
        break;
      }
      msg += (shown ? "; " : "") + w.where(r) + ": " + all[static_cast<std::size_t>(r)].value("msg", "");
      ++shown;
    }
  }
  throw Error(static_cast<Exit>(first.value("code", 1)), msg, first.value("hint", ""));
}

// ---------------------------------------------------------------- node side

// What one leader created in this run; removed again unless committed.
struct NodeWork {
  std::string dir;
  bool made_dir = false;
  std::string marker;  // set only when this run created it
  std::string partial;
  UniqueFd fd;
  bool committed = false;

  NodeWork() = default;
  NodeWork(const NodeWork&) = delete;
  NodeWork& operator=(const NodeWork&) = delete;
  ~NodeWork() {
    fd.reset();
    if (committed) {
      return;
    }
    if (!partial.empty()) {
      ::unlink(partial.c_str());
    }
    if (!marker.empty()) {
      ::unlink(marker.c_str());
    }
    // Only when empty, so never what was there before. Every leader that
    // marked the directory tries: when nodes wrongly share it, the last one
    // to remove its marker removes the directory.
    if (made_dir || !marker.empty()) {
      ::rmdir(dir.c_str());
    }
  }
};

std::string marker_name(const std::string& node) {
  std::string n = node;
  std::replace(n.begin(), n.end(), '/', '_');
  return ".node-" + n;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
  if (!d) {
    return out;
  }
  while (auto* e = ::readdir(d.get())) {
    std::string n = e->d_name;
    if (n != "." && n != "..") {
      out.push_back(n);
    }
  }
  return out;
}

// A verified copy at `staged`: its record's hash, else nullopt.
std::optional<std::string> verified_hash(const std::string& staged) {
  auto rec = read_record(record_path(staged));
  auto now = stamp_of(staged);
  if (rec && now && record_matches(*rec, *now)) {
    return rec->hash_hex;
  }
  return std::nullopt;
}

// Verified copies of the same image name in this user's private directories
// of earlier jobs under the same sif_dir (a re-deploy is a new job). Only
// directories that are ours and private count.
json sibling_copies(const std::string& sif_dir, const std::string& own_dir, const std::string& name) {
  json out = json::array();
  auto prefix = private_dir_prefix(::geteuid());
  for (const auto& n : list_dir(sif_dir)) {
    if (!starts_with(n, prefix)) {
      continue;
    }
    std::string dir = sif_dir + "/" + n;
    if (dir == own_dir) {
      continue;
    }
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() ||
        (st.st_mode & 0077) != 0) {
      continue;
    }
    std::string staged = dir + "/" + name;
    if (auto h = verified_hash(staged)) {
      out.push_back({{"path", staged}, {"hash", *h}});
      if (out.size() == 8) {
        break;
      }
    }
  }
  return out;
}

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

// A step of the transfer waited past Options::stall_timeout: the rank it
// waits for is gone or hangs, and every other rank of the job waits in a
// collective too. Nothing this rank wrote may stay behind. The other
// survivors reach their own deadlines a few chunks later and remove their
// files too: they get min(10 s, stall_timeout) before MPI_Abort ends them all.
[[noreturn]] void abandon_stalled(const std::string& partial, const std::string& what, double seconds) {
  if (!partial.empty()) {
    ::unlink(partial.c_str());
  }
  spdlog::error("stage: waited {:g} s for {}: a rank died or hangs (the launcher's output names it); removed this "
                "node's partial copy, ending the job",
                seconds, what);
  spdlog::error("hint: a slow file system or network needs a longer deploy.start_timeout");
  spdlog::default_logger()->flush();
  std::this_thread::sleep_for(std::chrono::duration<double>(std::min(10.0, seconds)));
  MpiSession::abort(static_cast<int>(Exit::stage));
}

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

// ---------------------------------------------------------------- mpi pipeline

struct Transfer {
  int code = 0;
  std::string msg;
  std::string hint;
  std::string hash;  // of the bytes this rank read (root) or wrote
};

// Pipelined chain broadcast over `x`: rank 0 reads `src` chunk by chunk and
// sends each chunk to rank 1, which forwards it to rank 2 as soon as it has
// it, and so on, every rank writing and hashing what passes through (into
// `out` when open). Each link carries the image once, so N nodes take about
// S/B + (N-1)*c/B instead of the (N-1)*S/B or log2(N)*S/B of sending every
// chunk from rank 0 (what a per-chunk MPI_Ibcast does for large chunks in
// Open MPI's libnbc: linear up to 4 ranks, binomial above).
//
// Stopping together: after each chunk every rank posts a non-blocking
// allreduce of its state (0, a failure code, 128+signal); before chunk i a
// rank waits for the one of chunk i-W. W covers the chain's depth, so the
// agreement never throttles the pipeline, and every rank that sees "stop"
// stops before the same chunk, so no message is left unmatched.
Transfer broadcast_file(MPI_Comm x, int src, const std::string& src_path, int out, const std::string& out_path,
                        std::uint64_t size, std::size_t chunk, double stall_timeout, Progress* progress) {
  int xr = 0;
  int xn = 1;
  MPI_Comm_rank(x, &xr);
  MPI_Comm_size(x, &xn);
  const bool root = xr == 0;
  const int prev = xr - 1;
  const int next = xr + 1 < xn ? xr + 1 : -1;
  const std::uint64_t n = chunk_count(size, chunk);
  constexpr std::uint64_t k_slots = 4;  // one written, one being forwarded, two arriving
  const std::uint64_t window = 2 * static_cast<std::uint64_t>(xn) + 8;
  const int throttle = throttle_ms();

  std::vector<std::unique_ptr<char[]>> slot;
  for (std::uint64_t s = 0; s < k_slots; ++s) {
    slot.push_back(std::make_unique_for_overwrite<char[]>(chunk));
  }
  std::vector<MPI_Request> recv(k_slots, MPI_REQUEST_NULL);
  std::vector<MPI_Request> send(k_slots, MPI_REQUEST_NULL);
  std::vector<MPI_Request> agree(window, MPI_REQUEST_NULL);
  std::vector<int> mine(window, 0);
  std::vector<int> any(window, 0);
  auto len = [&](std::uint64_t i) { return static_cast<int>(chunk_length(size, chunk, i)); };

  // Open MPI moves messages only inside MPI calls: test everything pending.
  auto poke = [&] {
    int flag = 0;
    for (auto* reqs : {&recv, &send}) {
      for (auto& r : *reqs) {
        if (r != MPI_REQUEST_NULL) {
          MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
        }
      }
    }
  };
  // Waiting yields the CPU between tests, and naps once a wait gets long.
  // Yielding keeps a waiter runnable, so it picks up the next chunk without
  // a scheduler round trip (on a busy machine a nap from the start made the
  // transfer 3x slower); napping after 2 ms stops a rank that waits on a slow
  // neighbour from taking the CPU the writers need (more ranks than cores).
  // A wait longer than stall_timeout ends the job (abandon_stalled); `what`
  // names whom it waits for.
  const auto stall = std::chrono::duration<double>(stall_timeout);
  auto wait = [&](MPI_Request& r, auto&& what) {
    int flag = 0;
    const auto since = Clock::now();
    while (r != MPI_REQUEST_NULL) {
      MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
      if (!flag) {
        poke();
        const auto waited = Clock::now() - since;
        if (waited < std::chrono::milliseconds(2)) {
          sched_yield();
        } else {
          if (stall_timeout > 0 && waited > stall) {
            abandon_stalled(out >= 0 ? out_path : std::string(), what(), stall_timeout);
          }
          timespec nap{0, 100'000};
          ::nanosleep(&nap, nullptr);
        }
      }
    }
  };
  auto from_prev = [&] { return fmt::format("a chunk from rank {} (the node before this one)", world_rank_of(x, prev)); };
  auto by_next = [&] { return fmt::format("rank {} (the node after this one) to take a chunk", world_rank_of(x, next)); };
  auto everyone = [] { return std::string("every node's word on a chunk"); };

  Hasher hasher;
  Transfer t;
  auto note = [&t](const Error& e) {
    if (t.code == 0) {
      t.code = static_cast<int>(e.code());
      t.msg = e.what();
      t.hint = e.hint();
    }
  };
  auto post_recv = [&](std::uint64_t j) {
    MPI_Irecv(slot[j % k_slots].get(), len(j), MPI_BYTE, prev, 0, x, &recv[j % k_slots]);
  };
  if (!root) {
    for (std::uint64_t j = 0; j < std::min(n, k_slots - 1); ++j) {
      post_recv(j);
    }
  }

  std::uint64_t stop_at = n;
  std::uint64_t done_bytes = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    if (i >= window) {
      const auto a = (i - window) % window;
      wait(agree[a], everyone);
      if (any[a] != 0) {
        stop_at = i;
        break;
      }
    }
    const auto s = i % k_slots;
    char* buf = slot[s].get();
    const auto n_i = static_cast<std::size_t>(len(i));
    if (root) {
      wait(send[s], by_next);  // chunk i-4 has left: the slot is free
      if (t.code == 0) {
        try {
          // Read and hash slice by slice, each slice while it is still in cache.
          for (std::size_t off = 0; off < n_i; off += k_slice) {
            const auto m = std::min(k_slice, n_i - off);
            if (read_full(src, buf + off, m, i * chunk + off, src_path) != m) {
              throw Error(Exit::image, src_path + " shrank while it was being staged",
                          "stage it again once whatever writes it has finished");
            }
            hasher.update(buf + off, m);
          }
        } catch (const Error& e) {
          note(e);  // the chunk still goes out: the others stop with us, W chunks on
        }
      }
    } else {
      wait(recv[s], from_prev);
      if (i == 0 && dies_in_stage(xr)) {
        std::_Exit(1);
      }
    }
    if (next >= 0) {
      MPI_Isend(buf, len(i), MPI_BYTE, next, 0, x, &send[s]);
    }
    if (t.code == 0 && (out >= 0 || !root)) {
      try {
        for (std::size_t off = 0; off < n_i; off += k_slice) {
          const auto m = std::min(k_slice, n_i - off);
          if (!root) {
            hasher.update(buf + off, m);  // right before writing it: one trip from memory
          }
          if (out >= 0) {
            write_all(out, buf + off, m, out_path);
          }
          poke();
        }
      } catch (const Error& e) {
        note(e);  // keep forwarding: the ranks after us must not wait for nothing
      }
      for (int ms = 0; ms < throttle && out >= 0; ++ms) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        poke();
      }
    }
    if (int sig = signal_code(); sig != 0 && t.code == 0) {
      t.code = sig;
      t.msg = "interrupted by " + signal_name(sig);
    }
    if (!root && i + k_slots - 1 < n) {
      const auto j = i + k_slots - 1;  // into the slot chunk i-1 used
      wait(send[j % k_slots], by_next);
      post_recv(j);
    }
    const auto a = i % window;
    mine[a] = std::max(t.code, 0);
    MPI_Iallreduce(&mine[a], &any[a], 1, MPI_INT, MPI_MAX, x, &agree[a]);
    done_bytes += static_cast<std::uint64_t>(len(i));
    if (progress != nullptr) {
      progress->update(done_bytes);
    }
  }
  // Receives posted for chunks nobody will send (an early stop).
  for (auto& r : recv) {
    if (r != MPI_REQUEST_NULL) {
      MPI_Cancel(&r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
    }
  }
  for (auto& r : send) {
    wait(r, by_next);
  }
  for (auto& r : agree) {
    wait(r, everyone);
  }
  if (stop_at < n) {
    if (root) {
      spdlog::debug("stage: every rank stopped before chunk {} of {}", stop_at, n);
    }
    if (t.code == 0) {
      t.code = -1;  // stopped because another rank failed; that rank names the reason
    }
  }
  t.hash = hasher.hex();
  return t;
}

// ---------------------------------------------------------------- plans

enum class Action { skip, link, copy };

struct Source {
  std::string path;
  std::string name;
  std::uint64_t size = 0;
  std::string known_hash;  // from the cache or hashed before the transfer
};

UniqueFd open_source(const std::string& path, FileStamp* stamp) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    throw Error(Exit::image, "cannot read " + path + ": " + errno_text(errno));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw Error(Exit::image, path + " is not a regular file");
  }
  if (stamp != nullptr) {
    *stamp = stamp_of(st);
  }
  ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  return fd;
}

std::string hash_source(const std::string& path, std::size_t chunk, const FileStamp& stamp) {
  auto started = realtime_ns();
  auto h = to_hex(hash_file(path, chunk, [] {
    if (int sig = signal_code(); sig != 0) {
      throw Error(static_cast<Exit>(sig), "interrupted by " + signal_name(sig));
    }
  }));
  SourceHashCache(SourceHashCache::default_file()).remember(path, stamp, h, started);
  return h;
}

void commit(NodeWork& nw, const std::string& staged, const std::string& hash, std::uint64_t size,
            const std::string& source) {
  nw.fd.reset();
  if (::rename(nw.partial.c_str(), staged.c_str()) != 0) {
    throw Error(Exit::stage, "cannot rename " + nw.partial + " to " + staged + ": " + errno_text(errno));
  }
  nw.committed = true;
  auto st = stamp_of(staged);
  if (!st) {
    throw Error(Exit::stage, "cannot stat " + staged + " after renaming it: " + errno_text(errno));
  }
  write_record(record_path(staged), StageRecord{.hash_hex = hash, .size = size, .stamp = *st, .source = source});
}

void remove_stale_partials(const std::string& staged, bool include_sbcast) {
  for (const auto& n : list_dir(dirname_of(staged))) {
    if (!is_partial_of(staged, n)) {
      continue;
    }
    pid_t pid = partial_pid(staged, n);
    bool sb = pid < 0;  // the sbcast partial has no pid
    if ((sb && include_sbcast) || (pid > 0 && pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH)) {
      ::unlink((dirname_of(staged) + "/" + n).c_str());
    }
  }
}

std::string summary_line(const Source& s, const Result& r, config::Transfer how, int linked) {
  std::string size = human_bytes(static_cast<double>(s.size));
  char secs[32];
  std::snprintf(secs, sizeof secs, "%.2f s", r.seconds);
  if (r.skipped) {
    return s.name + " (" + size + ") already staged on all " + std::to_string(r.nodes) +
           " node(s), nothing copied, " + secs + " [xxh3-128 " + r.hash_hex + "]";
  }
  const int copied = r.nodes_copied - linked;
  std::string line = "staged " + s.name + " (" + size + ") on " + std::to_string(r.nodes) + " node(s) in " + secs;
  if (copied > 0) {
    line += ": copied to " + std::to_string(copied) + " at " + rate_text(static_cast<double>(s.size), r.seconds) +
            " per node (" + rate_text(static_cast<double>(s.size) * copied, r.seconds) + " in all)";
  } else {
    line += ":";
  }
  if (linked > 0) {
    line += (copied > 0 ? ", " : " ") + std::string("hard-linked an earlier job's verified copy on ") +
            std::to_string(linked);
  }
  if (r.nodes_copied < r.nodes) {
    line += ", " + std::to_string(r.nodes - r.nodes_copied) + " already had it";
  }
  return line + " [" + config::to_string(how) + ", xxh3-128 " + r.hash_hex + "]";
}

World make_world(MPI_Comm comm, const Options& o) {
  World w;
  w.comm = comm;
  MPI_Comm_rank(comm, &w.rank);
  MPI_Comm_size(comm, &w.size);
  w.map = map_nodes(allgather_strings(comm, o.node_id));
  w.node = w.map.node_of_rank[static_cast<std::size_t>(w.rank)];
  w.leader = w.map.is_leader(w.rank);
  return w;
}

// ---------------------------------------------------------------- sbcast

json run_sbcast(const Options& o, const std::string& dest) {
  std::vector<std::string> argv = {"sbcast"};
  if (o.compress) {
    argv.push_back("--compress");
  }
  argv.insert(argv.end(), {"--force", o.source, dest});
  UniqueFd out(::memfd_create("sbcast-output", MFD_CLOEXEC));
  spdlog::info("running {}", join_argv(argv));
  auto child = spawn({.argv = argv, .stdout_fd = out.get(), .stderr_fd = out.get()});
  while (!child.try_wait()) {
    if (int sig = signal_code(); sig != 0) {
      child.terminate(std::chrono::seconds(2));
      return fail(sig, "interrupted by " + signal_name(sig) + " while sbcast ran");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (child.status() && (!WIFEXITED(*child.status()) || WEXITSTATUS(*child.status()) != 0)) {
    std::string text(4096, '\0');
    ssize_t n = ::pread(out.get(), text.data(), text.size(), 0);
    text.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    return fail(Exit::stage, join_argv(argv) + " " + describe_status(*child.status()) + ": " + trim(text),
                "check that the job's nodes can reach the file and that the directory exists on every node");
  }
  return ok();
}

}  // namespace

// ==================================================================== stage

Result stage_image(MPI_Comm comm, const Options& o) {
  const auto t0 = Clock::now();
  World w = make_world(comm, o);
  const bool root = w.rank == 0;
  auto phase = [&](const char* what) {
    if (root) {
      spdlog::debug("stage: {} at +{:.1f} ms", what,
                    std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
  };

  // -- A: rank 0 checks the source and the options before anything moves.
  Source src;
  UniqueFd src_fd;
  FileStamp src_stamp;
  json a = attempt([&]() -> json {
    if (!root) {
      return ok();
    }
    if (o.chunk_bytes < k_min_chunk || o.chunk_bytes > k_max_chunk) {
      throw Error(Exit::usage, "chunk size must be between 1 MiB and 1024 MiB, not " + human_bytes(static_cast<double>(o.chunk_bytes)));
    }
    if (o.transfer == config::Transfer::sbcast) {
      const char* job = std::getenv("SLURM_JOB_ID");
      if (job == nullptr || *job == '\0') {
        throw Error(Exit::usage, "--transfer sbcast needs a Slurm allocation (SLURM_JOB_ID is not set)",
                    "run inside sbatch/salloc, or use --transfer mpi");
      }
      if (!find_in_path("sbcast")) {
        throw Error(Exit::usage, "--transfer sbcast: sbcast is not in PATH", "load Slurm's module or use --transfer mpi");
      }
    }
    sif::check_magic(o.source);
    src_fd = open_source(o.source, &src_stamp);
    json j = ok({{"name", basename_of(o.source)}, {"size", src_stamp.size}});
    if (o.transfer != config::Transfer::none) {
      if (auto h = SourceHashCache(SourceHashCache::default_file()).lookup(o.source, src_stamp)) {
        j["hash"] = *h;
      }
    }
    return j;
  });
  a = bcast_json(comm, 0, a);
  if (a.value("code", 0) != 0) {
    throw Error(static_cast<Exit>(a.value("code", 1)), a.value("msg", ""), a.value("hint", ""));
  }
  src.path = o.source;
  src.name = a.value("name", "");
  src.size = a.value("size", std::uint64_t{0});
  src.known_hash = a.value("hash", "");

  Result res;
  res.bytes = src.size;
  res.nodes = w.map.nodes();
  res.leader = w.leader;
  res.node = w.node;
  res.node_names = w.map.names;

  // -- none: every node sees the source itself; check it there.
  if (o.transfer == config::Transfer::none) {
    src_fd.reset();
    json b = attempt([&]() -> json {
      if (!w.leader) {
        return ok();
      }
      try {
        sif::check_magic(o.source);
      } catch (const Error& e) {
        throw Error(Exit::stage, e.what(), "--transfer none needs the image on a file system every node sees");
      }
      auto size = file_size(o.source);
      if (!size || *size != src.size) {
        throw Error(Exit::stage,
                    o.source + " is " + (size ? human_bytes(static_cast<double>(*size)) : "unreadable") +
                        " here but " + human_bytes(static_cast<double>(src.size)) + " on rank 0",
                    "--transfer none needs one shared copy; use --transfer mpi to copy it to every node");
      }
      return ok();
    });
    throw_if_failed(w, gather_all(comm, b), "checking " + src.name);
    res.local_path = o.source;
    res.node_paths.assign(static_cast<std::size_t>(w.map.nodes()), o.source);
    res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (root) {
      spdlog::info("{} ({}) is readable on all {} node(s) [none: nothing copied]", src.name,
                   human_bytes(static_cast<double>(src.size)), res.nodes);
    }
    return res;
  }

  // -- B: each leader looks for a verified copy (its own, or an earlier job's).
  NodeWork nw;
  std::string staged;
  json b = attempt([&]() -> json {
    if (!w.leader) {
      return ok();
    }
    if (o.sif_dir.empty() || o.sif_dir.front() != '/') {
      throw Error(Exit::usage, "sif_path must be an absolute directory, not '" + o.sif_dir + "'",
                  "set singularity.sif_path or --sif-path to e.g. /tmp");
    }
    nw.dir = private_dir(o.sif_dir, ::geteuid(), o.jobid);
    staged = nw.dir + "/" + src.name;
    json j = ok({{"dir", nw.dir}});
    if (auto h = verified_hash(staged)) {
      j["have"] = *h;
    } else if (auto sib = sibling_copies(o.sif_dir, nw.dir, src.name); !sib.empty()) {
      j["siblings"] = sib;
    }
    return j;
  });
  auto bs = gather_all(comm, b);
  throw_if_failed(w, bs, "looking for staged copies of " + src.name);
  phase("looked for earlier copies");
  const auto& lead = [&](int node) -> const json& {
    return bs[static_cast<std::size_t>(w.map.leader_of_node[static_cast<std::size_t>(node)])];
  };
  for (int n = 0; n < w.map.nodes(); ++n) {
    res.node_paths.push_back(lead(n).value("dir", "") + "/" + src.name);
  }
  res.local_path = res.node_paths[static_cast<std::size_t>(w.node)];
  res.private_dir = lead(w.node).value("dir", "");

  if (o.transfer == config::Transfer::sbcast) {
    // sbcast writes one path on every node of the allocation.
    json v = attempt([&]() -> json {
      if (!root) {
        return ok();
      }
      for (int n = 1; n < w.map.nodes(); ++n) {
        if (lead(n).value("dir", "") != lead(0).value("dir", "")) {
          throw Error(Exit::usage,
                      "--transfer sbcast writes the same path on every node, but sif_path differs between nodes (" +
                          lead(0).value("dir", "") + " on " + w.map.names[0] + ", " + lead(n).value("dir", "") +
                          " on " + w.map.names[static_cast<std::size_t>(n)] + ")",
                      "drop %n from sif_path, or use --transfer mpi");
        }
      }
      const char* nn = std::getenv("SLURM_JOB_NUM_NODES");
      if (nn == nullptr) {
        nn = std::getenv("SLURM_NNODES");
      }
      if (nn != nullptr && std::atoi(nn) != w.map.nodes()) {
        throw Error(Exit::usage,
                    "--transfer sbcast writes to all " + std::string(nn) + " nodes of the allocation, but ranks run on " +
                        std::to_string(w.map.nodes()) + " of them",
                    "start one rank on every node (srun --ntasks-per-node=1), or use --transfer mpi");
      }
      return ok();
    });
    v = bcast_json(comm, 0, v);
    if (v.value("code", 0) != 0) {
      throw Error(static_cast<Exit>(v.value("code", 1)), v.value("msg", ""), v.value("hint", ""));
    }
  }

  // Rank 0 needs the source's hash before the transfer when some node may
  // skip it, and always for sbcast (nothing else hashes the source then).
  bool any_candidate = false;
  for (int n = 0; n < w.map.nodes(); ++n) {
    any_candidate = any_candidate || lead(n).contains("have") || lead(n).contains("siblings");
  }
  if ((any_candidate || o.transfer == config::Transfer::sbcast) && src.known_hash.empty()) {
    json h = attempt([&]() -> json {
      if (!root) {
        return ok();
      }
      spdlog::info("hashing {} ({}) to compare with the nodes' copies", src.path,
                   human_bytes(static_cast<double>(src.size)));
      return ok({{"hash", hash_source(src.path, o.chunk_bytes, src_stamp)}});
    });
    h = bcast_json(comm, 0, h);
    if (h.value("code", 0) != 0) {
      throw Error(static_cast<Exit>(h.value("code", 1)), h.value("msg", ""), h.value("hint", ""));
    }
    src.known_hash = h.value("hash", "");
  }

  // Every rank derives the same plan from the same data.
  std::vector<Action> plan;
  std::vector<std::string> link_from;
  for (int n = 0; n < w.map.nodes(); ++n) {
    const auto& l = lead(n);
    Action act = Action::copy;
    std::string from;
    if (!src.known_hash.empty() && l.value("have", "") == src.known_hash) {
      act = Action::skip;
    } else if (!src.known_hash.empty() && l.contains("siblings")) {
      for (const auto& s : l["siblings"]) {
        if (s.value("hash", "") == src.known_hash) {
          act = Action::link;
          from = s.value("path", "");
          break;
        }
      }
    }
    plan.push_back(act);
    link_from.push_back(from);
  }
  const Action mine = plan[static_cast<std::size_t>(w.node)];
  const bool all_skip = std::all_of(plan.begin(), plan.end(), [](Action a) { return a == Action::skip; });
  const bool any_copy = std::any_of(plan.begin(), plan.end(), [](Action a) { return a == Action::copy; });
  res.nodes_copied = static_cast<int>(std::count_if(plan.begin(), plan.end(), [](Action a) { return a != Action::skip; }));

  if (all_skip) {
    // Still an agreement: a signal on any rank is honoured the same way everywhere.
    throw_if_failed(w, gather_all(comm, attempt([] { return ok(); })), "staging " + src.name);
    res.skipped = true;
    res.hash_hex = src.known_hash;
    res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (root) {
      spdlog::info("{}", summary_line(src, res, o.transfer, 0));
    }
    return res;
  }

  // sbcast lands on every node, so every leader needs the directory then.
  const bool sb = o.transfer == config::Transfer::sbcast;
  const bool works = w.leader && (mine != Action::skip || sb);

  // -- C1: the private directory and a marker naming this node in it.
  json c1 = attempt([&]() -> json {
    if (!works) {
      return ok();
    }
    nw.made_dir = !path_exists(nw.dir);
    try {
      make_private_dir(nw.dir);
    } catch (const Error& e) {
      throw Error(Exit::stage, e.what(), e.hint());
    }
    const auto marker = nw.dir + "/" + marker_name(w.map.names[static_cast<std::size_t>(w.node)]);
    UniqueFd m(::open(marker.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (m) {
      nw.marker = marker;
    } else if (errno != EEXIST) {
      throw Error(Exit::stage, "cannot write in " + nw.dir + ": " + errno_text(errno));
    }
    return ok();
  });
  throw_if_failed(w, gather_all(comm, c1), "staging " + src.name);
  phase("private directories ready");

  // This node's partial file as a hard link to an earlier job's verified copy.
  auto link_earlier_copy = [&] {
    nw.partial = partial_path(staged, ::getpid());
    const auto& from = link_from[static_cast<std::size_t>(w.node)];
    if (::link(from.c_str(), nw.partial.c_str()) != 0) {
      throw Error(Exit::stage, "cannot link " + from + " to " + nw.partial + ": " + errno_text(errno));
    }
  };

  // -- C2: refuse a directory shared between nodes (every node would write
  // the same file), then open the partial file (or hard-link an earlier copy).
  json c2 = attempt([&]() -> json {
    if (!works) {
      return ok();
    }
    auto own = marker_name(w.map.names[static_cast<std::size_t>(w.node)]);
    for (const auto& n : list_dir(nw.dir)) {
      if (starts_with(n, ".node-") && n != own) {
        throw Error(Exit::usage,
                    nw.dir + " is shared with another node (" + n.substr(6) + " wrote there too)",
                    "for a shared file system use --transfer none; else give each node its own sif_path (e.g. /tmp, or add %n)");
      }
    }
    remove_stale_partials(staged, sb);
    if (sb) {
      nw.partial = sbcast_partial_path(staged);
      return ok();
    }
    if (mine == Action::link) {
      link_earlier_copy();
      return ok();
    }
    if (mine == Action::copy) {
      nw.partial = partial_path(staged, ::getpid());
      nw.fd.reset(::open(nw.partial.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
      if (!nw.fd) {
        nw.partial.clear();  // not ours to remove
        throw Error(Exit::stage, "cannot create a file in " + nw.dir + ": " + errno_text(errno));
      }
      // A disk without room fails here, before any byte moves. statvfs, not
      // fallocate: preallocated (unwritten) extents cost ext4 a conversion on
      // every write, and a write that still hits ENOSPC is handled anyway.
      struct statvfs vfs {};
      if (::fstatvfs(nw.fd.get(), &vfs) == 0) {
        const auto room = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
        if (room < src.size) {
          throw Error(Exit::stage,
                      "not enough space in " + nw.dir + ": " + human_bytes(static_cast<double>(src.size)) +
                          " needed, " + human_bytes(static_cast<double>(room)) + " free",
                      "free space there or choose another sif_path");
        }
      }
    }
    return ok();
  });
  throw_if_failed(w, gather_all(comm, c2), "staging " + src.name);
  phase("partial files open");

  // -- D: move the bytes.
  json d = ok();
  const bool xfer = !sb && any_copy && (root || (w.leader && mine == Action::copy));
  if (!sb && any_copy) {
    MPI_Comm x = MPI_COMM_NULL;
    MPI_Comm_split(comm, xfer ? 0 : MPI_UNDEFINED, w.rank, &x);
    if (xfer) {
      std::optional<Progress> prog;
      if (root) {
        prog.emplace(src.size, o.progress);
      }
      const bool write_here = w.leader && mine == Action::copy;
      auto t = broadcast_file(x, root ? src_fd.get() : -1, src.path, write_here ? nw.fd.get() : -1, nw.partial, src.size,
                              o.chunk_bytes, o.stall_timeout, prog ? &*prog : nullptr);
      if (prog) {
        prog->finish();
      }
      MPI_Comm_free(&x);
      if (t.code > 0) {
        d = fail(t.code, t.msg, t.hint);
      } else if (t.code < 0) {
        d = ok({{"stopped", true}});
      } else {
        d = ok({{"hash", t.hash}});
        if (root) {
          d["source_hash"] = t.hash;
        }
      }
    }
  } else if (sb) {
    // Nothing to send when every node skips or hard-links.
    json r = root && any_copy ? attempt([&] { return run_sbcast(o, sbcast_partial_path(res.node_paths[0])); }) : ok();
    r = bcast_json(comm, 0, r);
    if (r.value("code", 0) != 0) {
      throw Error(static_cast<Exit>(r.value("code", 1)), r.value("msg", ""), r.value("hint", ""));
    }
    d = attempt([&]() -> json {
      if (!w.leader) {
        return ok();
      }
      if (mine != Action::copy) {
        ::unlink(nw.partial.c_str());  // sbcast wrote it here too; this node needs none
        nw.partial.clear();
        if (mine == Action::link) {
          link_earlier_copy();
        }
        return ok();
      }
      if (!path_exists(nw.partial)) {
        throw Error(Exit::stage, "sbcast reported success but " + nw.partial + " is missing");
      }
      ::chmod(nw.partial.c_str(), 0600);
      return ok({{"hash", to_hex(hash_file(nw.partial, o.chunk_bytes, [] {
                   if (int sig = signal_code(); sig != 0) {
                     throw Error(static_cast<Exit>(sig), "interrupted by " + signal_name(sig));
                   }
                 }))}});
    });
  }
  src_fd.reset();

  phase("bytes moved on rank 0");
  // -- E: every copy against rank 0's hash.
  // Without spinning: ranks with nothing to do (other ranks on a node, nodes
  // that skip) would otherwise take CPU from the leader writing on their node.
  // They wait as long as the transfer takes; a rank of the transfer expects
  // them here already (a rank that died among them would hold it forever).
  const auto arrived = Clock::now();
  barrier_quietly(comm, std::chrono::milliseconds(1), [&] {
    if (xfer && o.stall_timeout > 0 &&
        Clock::now() - arrived > std::chrono::duration<double>(o.stall_timeout)) {
      abandon_stalled(nw.partial, "every rank to reach the end of the transfer", o.stall_timeout);
    }
  });
  phase("every rank done moving");
  if (int sig = signal_code(); sig != 0 && d.value("code", 0) == 0) {
    d = fail(sig, "interrupted by " + signal_name(sig));
  }
  auto es = gather_all(comm, d);
  throw_if_failed(w, es, "staging " + src.name);
  std::string reference = src.known_hash;
  if (!sb) {
    std::string streamed = es[0].value("source_hash", "");
    if (!reference.empty() && !streamed.empty() && streamed != reference) {
      throw Error(Exit::image, src.path + " changed while it was being staged (its hash is not the one it had)",
                  "stage it again once whatever writes it has finished");
    }
    if (reference.empty()) {
      reference = streamed;
    }
  }
  json f = attempt([&]() -> json {
    if (!w.leader || mine == Action::skip) {
      return ok();
    }
    if (mine == Action::copy) {
      auto h = d.value("hash", "");
      if (h != reference) {
        throw Error(Exit::stage, "the copy's xxh3-128 " + h + " differs from rank 0's " + reference,
                    "the data was damaged on its way or on this node's disk: stage again");
      }
    }
    commit(nw, staged, reference, src.size, src.path);
    return ok();
  });
  if (root && !sb && src.known_hash.empty()) {
    // Read starting at t0: only a source untouched since well before then is remembered.
    SourceHashCache(SourceHashCache::default_file())
        .remember(src.path, src_stamp, reference,
                  realtime_ns() - std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
  }
  throw_if_failed(w, gather_all(comm, f), "verifying " + src.name);
  phase("renamed and recorded");
  res.hash_hex = reference;
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (root) {
    spdlog::info("{}", summary_line(src, res, o.transfer,
                                    static_cast<int>(std::count(plan.begin(), plan.end(), Action::link))));
  }
  return res;
}

// ==================================================================== cleanup

namespace {

void remove_on_nodes(MPI_Comm comm, const World& w, bool leader, const std::string& dir, const std::string& staged) {
  json s = attempt([&]() -> json {
    if (!leader || dir.empty()) {
      return ok();
    }
    for (const auto& p : {staged, record_path(staged)}) {
      if (::unlink(p.c_str()) != 0 && errno != ENOENT) {
        throw Error(Exit::stage, "cannot remove " + p + ": " + errno_text(errno));
      }
    }
    remove_stale_partials(staged, true);
    auto left = list_dir(dir);
    bool only_markers = std::all_of(left.begin(), left.end(), [](const std::string& n) { return starts_with(n, ".node-"); });
    if (only_markers) {
      for (const auto& n : left) {
        ::unlink((dir + "/" + n).c_str());
      }
      if (::rmdir(dir.c_str()) != 0 && errno != ENOENT && errno != ENOTEMPTY) {
        throw Error(Exit::stage, "cannot remove " + dir + ": " + errno_text(errno));
      }
    }
    return ok();
  }, false);
  throw_if_failed(w, gather_all(comm, s), "removing the staged image");
}

}  // namespace

void cleanup(MPI_Comm comm, const Result& r) {
  Options o;
  o.node_id = static_cast<std::size_t>(r.node) < r.node_names.size() ? r.node_names[static_cast<std::size_t>(r.node)]
                                                                      : std::string();
  World w = make_world(comm, o);
  remove_on_nodes(comm, w, r.leader, r.private_dir, r.local_path);
  if (w.rank == 0 && !r.private_dir.empty()) {
    spdlog::info("removed {} from {} node(s)", basename_of(r.local_path), r.nodes);
  }
}

void cleanup(MPI_Comm comm, const Options& o) {
  World w = make_world(comm, o);
  std::string dir;
  std::string staged;
  if (w.leader) {
    if (o.sif_dir.empty() || o.sif_dir.front() != '/') {
      // Nothing can be there; still take part in the agreement.
      dir.clear();
    } else {
      dir = private_dir(o.sif_dir, ::geteuid(), o.jobid);
      staged = dir + "/" + basename_of(o.source);
    }
  }
  remove_on_nodes(comm, w, w.leader, dir, staged);
  if (w.rank == 0) {
    spdlog::info("removed {} from this job's private directory on {} node(s)", basename_of(o.source), w.map.nodes());
  }
}

}  // namespace lhpc::stage
