// The phases of stage (see stage.h), in order. Every phase is local work
// that cannot throw past attempt(), then an agreement on the whole
// communicator (stage/agreement.h); the decisions that follow are computed by
// every rank from the same gathered data, so all ranks take the same branch.
#include "stage/stage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>

#include "sif/sif.h"
#include "stage/agreement.h"
#include "stage/hash.h"
#include "stage/layout.h"
#include "stage/node_files.h"
#include "stage/pipeline.h"
#include "stage/progress.h"
#include "stage/record.h"
#include "stage/sbcast.h"
#include "util/error.h"
#include "util/fd.h"
#include "util/fs.h"
#include "util/mpi.h"
#include "util/strings.h"

namespace lhpc::stage {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr std::size_t k_min_chunk = std::size_t{1} << 20;
constexpr std::size_t k_max_chunk = std::size_t{1} << 30;

enum class Action { skip, link, copy };

struct Source {
  std::string path;
  std::string name;
  std::uint64_t size = 0;
  std::string known_hash;  // from the cache or hashed before the transfer
};

// Every rank's copy of one stage run; the phases below fill it in order.
struct Run {
  const Options& o;
  World w;
  Clock::time_point t0 = Clock::now();
  Source src;
  UniqueFd src_fd;                     // rank 0
  FileStamp src_stamp;                 // rank 0
  NodeWork nw;                         // leaders
  std::string staged;                  // leaders: the image's final path on this node
  std::vector<Outcome> found;          // every rank's outcome of looking for copies
  std::vector<Action> plan;            // per node
  std::vector<std::string> link_from;  // per node, for Action::link
  Outcome moved;                       // this rank's outcome of moving the bytes
  std::string link_hash;               // leaders that linked an earlier job's copy: its hash, taken again
  bool in_transfer = false;            // this rank is one of the MPI chain
  Result res;

  Run(const Options& opts, World world) : o(opts), w(std::move(world)) {}
  bool root() const { return w.root(); }
  bool sbcast() const { return o.transfer == config::Transfer::sbcast; }
  Action mine() const { return plan[static_cast<std::size_t>(w.node)]; }
  const json& lead(int node) const {
    return found[static_cast<std::size_t>(w.map.leader_of_node[static_cast<std::size_t>(node)])].data;
  }
  void phase(const char* what) const {
    if (root()) {
      spdlog::debug("stage: {} at +{:.1f} ms", what,
                    std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
  }
  double seconds() const { return std::chrono::duration<double>(Clock::now() - t0).count(); }
};

// O_NONBLOCK until the type is known: opening a FIFO must not hang.
UniqueFd open_source(const std::string& path, FileStamp* stamp) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    throw Error(Exit::image, "cannot read " + path + ": " + errno_text(errno));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw Error(Exit::image, path + " is not a regular file" + (S_ISFIFO(st.st_mode) ? " (a FIFO)" : ""),
                "give the path of a .sif image file");
  }
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  if (stamp != nullptr) {
    *stamp = stamp_of(st);
  }
  ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  return fd;
}

std::string hash_source(const std::string& path, std::size_t chunk, const FileStamp& stamp) {
  auto started = realtime_ns();
  auto h = to_hex(hash_file(path, chunk, throw_if_signalled));
  SourceHashCache(SourceHashCache::default_file()).remember(path, stamp, h, started);
  return h;
}

std::string summary_line(const Source& s, const Result& r, config::Transfer how, int linked) {
  std::string size = human_bytes(static_cast<double>(s.size));
  char secs[32];
  std::snprintf(secs, sizeof secs, "%.2f s", r.seconds);
  if (r.skipped) {
    return s.name + " (" + size + ") already staged on all " + std::to_string(r.nodes) + " node(s), nothing copied, " +
           secs + " [xxh3-128 " + r.hash_hex + "]";
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
  return line + " [" + std::string(config::k_transfer_names.text(how)) + ", xxh3-128 " + r.hash_hex + "]";
}

// -- A: rank 0 checks the options and the source before anything moves.
void check_source(Run& run) {
  const auto& o = run.o;
  auto a = attempt([&]() -> json {
    if (!run.root()) {
      return json::object();
    }
    if (o.chunk_bytes < k_min_chunk || o.chunk_bytes > k_max_chunk) {
      throw Error(Exit::usage, "chunk size must be between 1 MiB and 1024 MiB, not " +
                                   human_bytes(static_cast<double>(o.chunk_bytes)));
    }
    if (run.sbcast()) {
      check_sbcast_usable();
    }
    run.src_fd = open_source(o.source, &run.src_stamp);
    sif::check_magic(o.source);
    json j = {{"name", basename_of(o.source)}, {"size", run.src_stamp.size}};
    if (o.transfer != config::Transfer::none) {
      if (auto h = SourceHashCache(SourceHashCache::default_file()).lookup(o.source, run.src_stamp)) {
        j["hash"] = *h;
      }
    }
    return j;
  });
  json d = share_root_outcome(run.w.comm, 0, a);
  run.src.path = o.source;
  run.src.name = d.value("name", "");
  run.src.size = d.value("size", std::uint64_t{0});
  run.src.known_hash = d.value("hash", "");
  auto& res = run.res;
  res.bytes = run.src.size;
  res.nodes = run.w.map.nodes();
  res.leader = run.w.leader;
  res.node = run.w.node;
  res.node_names = run.w.map.names;
}

// -- none: every node sees the source itself; check it there.
Result check_shared_source(Run& run) {
  const auto& o = run.o;
  run.src_fd.reset();
  auto b = attempt([&]() -> json {
    if (!run.w.leader) {
      return json::object();
    }
    try {
      sif::check_magic(o.source);
    } catch (const Error& e) {
      throw Error(Exit::stage, e.what(), "--transfer none needs the image on a file system every node sees");
    }
    auto size = file_size(o.source);
    if (!size || *size != run.src.size) {
      throw Error(Exit::stage,
                  o.source + " is " + (size ? human_bytes(static_cast<double>(*size)) : "unreadable") + " here but " +
                      human_bytes(static_cast<double>(run.src.size)) + " on rank 0",
                  "--transfer none needs one shared copy; use --transfer mpi to copy it to every node");
    }
    return json::object();
  });
  agree(run.w, b, "checking " + run.src.name);
  auto& res = run.res;
  res.local_path = o.source;
  res.node_paths.assign(static_cast<std::size_t>(run.w.map.nodes()), o.source);
  res.seconds = run.seconds();
  if (run.root()) {
    spdlog::info("{} ({}) is readable on all {} node(s) [none: nothing copied]", run.src.name,
                 human_bytes(static_cast<double>(run.src.size)), res.nodes);
  }
  return res;
}

// -- B: each leader looks for a verified copy (its own, or an earlier job's).
void look_for_copies(Run& run) {
  const auto& o = run.o;
  auto b = attempt([&]() -> json {
    if (!run.w.leader) {
      return json::object();
    }
    if (o.sif_dir.empty() || o.sif_dir.front() != '/') {
      throw Error(Exit::usage, "sif_path must be an absolute directory, not '" + o.sif_dir + "'",
                  "set singularity.sif_path or --sif-path to e.g. /tmp");
    }
    open_node_dir(run.nw, o.sif_dir, o.jobid);
    run.staged = run.nw.dir + "/" + run.src.name;
    json j = {{"dir", run.nw.dir}};
    if (auto h = verified_hash(run.nw, run.src.name)) {
      j["have"] = *h;
    } else if (auto sib = sibling_copies(run.nw, run.src.name); !sib.empty()) {
      j["siblings"] = sib;
    }
    return j;
  });
  run.found = agree(run.w, b, "looking for staged copies of " + run.src.name);
  run.phase("looked for earlier copies");
  auto& res = run.res;
  for (int n = 0; n < run.w.map.nodes(); ++n) {
    res.node_paths.push_back(run.lead(n).value("dir", "") + "/" + run.src.name);
  }
  res.local_path = res.node_paths[static_cast<std::size_t>(run.w.node)];
  res.private_dir = run.lead(run.w.node).value("dir", "");
}

// sbcast writes one path on every node of the allocation.
void check_sbcast_nodes(Run& run) {
  auto v = attempt([&]() -> json {
    if (run.root()) {
      std::vector<std::string> dirs;
      for (int n = 0; n < run.w.map.nodes(); ++n) {
        dirs.push_back(run.lead(n).value("dir", ""));
      }
      check_sbcast_layout(run.w.map.names, dirs);
    }
    return json::object();
  });
  share_root_outcome(run.w.comm, 0, v);
}

// Rank 0 needs the source's hash before the transfer when some node may
// skip it, and always for sbcast (nothing else hashes the source then).
void learn_source_hash(Run& run) {
  bool any_candidate = false;
  for (int n = 0; n < run.w.map.nodes(); ++n) {
    any_candidate = any_candidate || run.lead(n).contains("have") || run.lead(n).contains("siblings");
  }
  if ((!any_candidate && !run.sbcast()) || !run.src.known_hash.empty()) {
    return;
  }
  auto h = attempt([&]() -> json {
    if (!run.root()) {
      return json::object();
    }
    spdlog::info("hashing {} ({}) to compare with the nodes' copies", run.src.path,
                 human_bytes(static_cast<double>(run.src.size)));
    return {{"hash", hash_source(run.src.path, run.o.chunk_bytes, run.src_stamp)}};
  });
  run.src.known_hash = share_root_outcome(run.w.comm, 0, h).value("hash", "");
}

// Every rank derives the same plan from the same data.
void make_plan(Run& run) {
  const auto& known = run.src.known_hash;
  for (int n = 0; n < run.w.map.nodes(); ++n) {
    const auto& l = run.lead(n);
    Action act = Action::copy;
    std::string from;
    if (!known.empty() && l.value("have", "") == known) {
      act = Action::skip;
    } else if (!known.empty() && l.contains("siblings")) {
      for (const auto& s : l["siblings"]) {
        if (s.value("hash", "") == known) {
          act = Action::link;
          from = s.value("path", "");
          break;
        }
      }
    }
    run.plan.push_back(act);
    run.link_from.push_back(from);
  }
  run.res.nodes_copied =
      static_cast<int>(std::count_if(run.plan.begin(), run.plan.end(), [](Action a) { return a != Action::skip; }));
}

void link_earlier(Run& run) {
  run.link_hash =
      link_earlier_copy(run.nw, run.staged, run.link_from[static_cast<std::size_t>(run.w.node)], run.o.chunk_bytes);
}

bool all_skip(const Run& run) {
  return std::all_of(run.plan.begin(), run.plan.end(), [](Action a) { return a == Action::skip; });
}
bool any_copy(const Run& run) {
  return std::any_of(run.plan.begin(), run.plan.end(), [](Action a) { return a == Action::copy; });
}
// sbcast lands on every node, so every leader needs the directory then.
bool works_here(const Run& run) { return run.w.leader && (run.mine() != Action::skip || run.sbcast()); }

Result finish_skipped(Run& run) {
  // Still an agreement: a signal on any rank is honoured the same way everywhere.
  agree(run.w, attempt([] { return json::object(); }), "staging " + run.src.name);
  auto& res = run.res;
  res.skipped = true;
  res.hash_hex = run.src.known_hash;
  res.seconds = run.seconds();
  if (run.root()) {
    spdlog::info("{}", summary_line(run.src, res, run.o.transfer, 0));
  }
  return res;
}

// -- C: the private directories and their markers, then the partial files
// (or hard links to an earlier job's copies).
void prepare_nodes(Run& run) {
  auto c1 = attempt([&]() -> json {
    if (works_here(run)) {
      prepare_private_dir(run.nw, run.w.node_name());
    }
    return json::object();
  });
  agree(run.w, c1, "staging " + run.src.name);
  run.phase("private directories ready");
  auto c2 = attempt([&]() -> json {
    if (!works_here(run)) {
      return json::object();
    }
    refuse_shared_dir(run.nw, run.w.node_name());
    remove_stale_partials(run.nw, run.staged, run.sbcast());
    if (run.sbcast()) {
      run.nw.partial = sbcast_partial_path(run.staged);
    } else if (run.mine() == Action::link) {
      link_earlier(run);
    } else if (run.mine() == Action::copy) {
      open_partial(run.nw, run.staged, run.src.size);
    }
    return json::object();
  });
  agree(run.w, c2, "staging " + run.src.name);
  run.phase("partial files open");
}

// -- D (mpi): the chain of rank 0 and the leaders of copying nodes.
void move_by_mpi(Run& run) {
  const bool root = run.root();
  const bool write_here = run.w.leader && run.mine() == Action::copy;
  run.in_transfer = root || write_here;
  MPI_Comm x = MPI_COMM_NULL;
  MPI_Comm_split(run.w.comm, run.in_transfer ? 0 : MPI_UNDEFINED, run.w.rank, &x);
  if (!run.in_transfer) {
    return;
  }
  std::optional<Progress> prog;
  if (root) {
    prog.emplace(run.src.size, run.o.progress);
  }
  ChainEnds ends{.src_fd = root ? run.src_fd.get() : -1,
                 .src_path = run.src.path,
                 .out_fd = write_here ? run.nw.fd.get() : -1,
                 .out_path = run.nw.partial};
  auto t = broadcast_file(x, ends, run.src.size, run.o.chunk_bytes, run.o.stall_timeout, prog ? &*prog : nullptr,
                          run.o.tick);
  if (prog) {
    prog->finish();
  }
  MPI_Comm_free(&x);
  if (t.error) {
    run.moved = Outcome{.error = t.error, .data = json::object()};
  } else if (t.stopped) {
    run.moved = ok({{"stopped", true}});
  } else {
    run.moved = ok({{"hash", t.hash}});
    if (root) {
      run.moved.data["source_hash"] = t.hash;
    }
  }
}

// -- D (sbcast): rank 0 runs sbcast; every copying leader hashes its copy.
void move_by_sbcast(Run& run) {
  // Nothing to send when every node skips or hard-links.
  auto r = run.root() && any_copy(run) ? attempt([&] {
    auto out = run_sbcast(run.o, sbcast_partial_path(run.res.node_paths[0]));
    if (out.error) {
      throw *out.error;
    }
    return json::object();
  })
                                       : ok();
  share_root_outcome(run.w.comm, 0, r);
  run.moved = attempt([&]() -> json {
    auto& nw = run.nw;
    if (!run.w.leader) {
      return json::object();
    }
    if (run.mine() != Action::copy) {
      drop_partial(nw);  // sbcast wrote it here too; this node needs none
      if (run.mine() == Action::link) {
        link_earlier(run);
      }
      return json::object();
    }
    return {{"hash", hash_sbcast_partial(nw, run.o.chunk_bytes)}};
  });
}

// -- E: every rank at the end of the transfer, then everyone's outcome.
// Without spinning: ranks with nothing to do (other ranks on a node, nodes
// that skip) would otherwise take CPU from the leader writing on their node.
// They wait as long as the transfer takes; a rank of the transfer expects
// them here already (a rank that died among them would hold it forever).
std::string agree_on_transfer(Run& run) {
  const auto arrived = Clock::now();
  barrier_quietly(run.w.comm, std::chrono::milliseconds(1), [&] {
    if (run.in_transfer && run.o.stall_timeout > 0 &&
        Clock::now() - arrived > std::chrono::duration<double>(run.o.stall_timeout)) {
      abandon_stalled(run.nw.partial, "every rank to reach the end of the transfer", run.o.stall_timeout);
    }
    if (run.o.tick) {
      run.o.tick();
    }
  });
  run.phase("every rank done moving");
  if (auto sig = signal_exit(); sig && !run.moved.error) {
    run.moved = failed(*sig, "interrupted by " + signal_name(*sig));
  }
  auto all = agree(run.w, run.moved, "staging " + run.src.name);
  std::string reference = run.src.known_hash;
  if (!run.sbcast()) {
    std::string streamed = all[0].data.value("source_hash", "");
    if (!reference.empty() && !streamed.empty() && streamed != reference) {
      throw Error(Exit::image, run.src.path + " changed while it was being staged (its hash is not the one it had)",
                  "stage it again once whatever writes it has finished");
    }
    if (reference.empty()) {
      reference = streamed;
    }
  }
  return reference;
}

// -- F: each copy against rank 0's hash, renamed into place with its record.
void verify_and_commit(Run& run, const std::string& reference) {
  auto f = attempt([&]() -> json {
    if (!run.w.leader || run.mine() == Action::skip) {
      return json::object();
    }
    if (run.mine() != Action::skip) {
      auto h = run.mine() == Action::link ? run.link_hash : run.moved.data.value("hash", "");
      if (h != reference) {
        throw Error(Exit::stage, "the copy's xxh3-128 " + h + " differs from rank 0's " + reference,
                    "the data was damaged on its way or on this node's disk: stage again");
      }
    }
    commit(run.nw, run.staged, reference, run.src.size, run.src.path);
    return json::object();
  });
  if (run.root() && !run.sbcast() && run.src.known_hash.empty()) {
    // Read starting at t0: only a source untouched since well before then is remembered.
    SourceHashCache(SourceHashCache::default_file())
        .remember(run.src.path, run.src_stamp, reference,
                  realtime_ns() - std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - run.t0).count());
  }
  agree(run.w, f, "verifying " + run.src.name);
  run.phase("renamed and recorded");
}

}  // namespace

Result stage_image(MPI_Comm comm, const Options& o) {
  Run run(o, make_world(comm, o.node_id));
  check_source(run);
  if (o.transfer == config::Transfer::none) {
    return check_shared_source(run);
  }
  look_for_copies(run);
  if (run.sbcast()) {
    check_sbcast_nodes(run);
  }
  learn_source_hash(run);
  make_plan(run);
  if (all_skip(run)) {
    return finish_skipped(run);
  }
  prepare_nodes(run);
  if (run.sbcast()) {
    move_by_sbcast(run);
  } else if (any_copy(run)) {
    move_by_mpi(run);
  }
  run.src_fd.reset();
  run.phase("bytes moved on rank 0");
  const auto reference = agree_on_transfer(run);
  verify_and_commit(run, reference);
  run.res.hash_hex = reference;
  run.res.seconds = run.seconds();
  if (run.root()) {
    spdlog::info("{}", summary_line(run.src, run.res, o.transfer,
                                    static_cast<int>(std::count(run.plan.begin(), run.plan.end(), Action::link))));
  }
  return run.res;
}

// ==================================================================== cleanup

namespace {

// `where` runs on leaders and names the directory and the image to remove
// there (an empty directory: nothing to do).
void remove_on_nodes(const World& w, const std::function<std::pair<std::string, std::string>()>& where) {
  auto s = attempt(
      [&]() -> json {
        if (w.leader) {
          auto [dir, staged] = where();
          if (!dir.empty()) {
            remove_staged(dir, staged);
          }
        }
        return json::object();
      },
      false);
  agree(w, s, "removing the staged image");
}

}  // namespace

void cleanup(MPI_Comm comm, const Result& r) {
  const auto node = static_cast<std::size_t>(r.node) < r.node_names.size()
                        ? r.node_names[static_cast<std::size_t>(r.node)]
                        : std::string();
  World w = make_world(comm, node);
  remove_on_nodes(w, [&] { return std::pair(r.leader ? r.private_dir : std::string(), r.local_path); });
  if (w.rank == 0 && !r.private_dir.empty()) {
    spdlog::info("removed {} from {} node(s)", basename_of(r.local_path), r.nodes);
  }
}

void cleanup(MPI_Comm comm, const Options& o) {
  World w = make_world(comm, o.node_id);
  remove_on_nodes(w, [&] {
    // A relative sif_dir can hold nothing of ours.
    if (o.sif_dir.empty() || o.sif_dir.front() != '/') {
      return std::pair(std::string(), std::string());
    }
    check_path_component("the job id ($SLURM_JOB_ID or $LITHOPS_HPC_JOB_ID)", o.jobid);
    auto dir = private_dir(o.sif_dir, ::geteuid(), o.jobid);
    return std::pair(dir, dir + "/" + basename_of(o.source));
  });
  if (w.rank == 0) {
    spdlog::info("removed {} from this job's private directory on {} node(s)", basename_of(o.source), w.map.nodes());
  }
}

}  // namespace lhpc::stage
