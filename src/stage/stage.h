// Getting the runtime image onto every node before workers start: the
// `stage` command and the first step of `deploy`.
//
//   mpi     rank 0 reads the source once and sends it in chunks down a
//           chain of one leader rank per node; each leader forwards a chunk
//           to the next as soon as it has it and writes and hashes it
//           meanwhile (pipelined: about S/B + (N-1)*chunk/B for N nodes).
//           Leaders write a partial file in the private directory and rename
//           it into place only when its XXH3-128 matches rank 0's.
//   sbcast  rank 0 runs Slurm's sbcast into the same private path on every
//           node of the allocation; every leader then hashes its copy.
//   none    the source is already visible on every node (shared file
//           system): every leader checks it is readable, a SIF, and the size
//           rank 0 sees. Nothing is copied or hashed.
//
// Every step that can fail on one rank ends in an agreement over the whole
// communicator, so all ranks throw the same Error (same exit code, the
// failing nodes named) and none is left waiting in a collective. Partial
// files are removed on every failure; a copy is renamed into place on any
// node only when every node verified its copy.
//
// Signals: the caller installs a SignalPipe for SIGINT/SIGTERM (one per
// process); stage polls SignalPipe::last_terminating() between chunks and at
// every agreement, and a signal on any rank stops all of them with 130/143
// (during the transfer within 2N+8 chunks of N nodes: the depth of the
// pipeline, so that agreeing never slows it down).
//
// A rank that dies mid-transfer (under srun --kill-on-bad-exit=0 the others
// live on) would leave the rest waiting for it forever: a rank of the MPI
// transfer that waits longer than `stall_timeout` for one step (a chunk from
// its neighbour, a chunk taken, the chunk agreement, the ranks that did not
// transfer) removes its partial file, logs whom it waited for and ends the
// job with MPI_Abort (exit 7).
//
// Trust: a node's private directory is used only when it is ours and
// private under a trusted sif_path (stage/node_files.h, util/fs.h); one
// someone else made is refused before anything in it is read.
//
// Test builds only (meson -Dtest_hooks=true): LITHOPS_HPC_STAGE_THROTTLE_MS=N makes every writing leader sleep
// N ms per chunk, so tests can interrupt a transfer of a small image;
// LITHOPS_HPC_TEST_DIE_IN_STAGE=R makes rank R of the transfer exit after
// receiving its first chunk, as a rank that crashes mid-transfer.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"

namespace lhpc::stage {

struct Options {
  std::string source;   // the .sif as rank 0 sees it (other ranks: only its base name is used)
  std::string sif_dir;  // expanded singularity.sif_path on this rank (may differ per node via %n)
  config::Transfer transfer = config::Transfer::mpi;
  std::size_t chunk_bytes = std::size_t{8} << 20;  // 1 MiB .. 1 GiB
  bool compress = false;                           // sbcast --compress
  std::string jobid;                               // names the private directory
  std::string node_id;                             // this rank's node (LITHOPS_HPC_NODE_ID or the short hostname)
  bool progress = false;                           // stderr is a terminal: redraw a progress line (rank 0)
  double stall_timeout = 0;  // seconds one step of the MPI transfer may wait (deploy.start_timeout); 0: forever
  // Called often while this rank waits or throttles (the transfer, sbcast,
  // the ranks that did not transfer): deploy keeps health reports and the
  // status file going through a long stage. Cheap, and no collective. May be empty.
  std::function<void()> tick;
};

struct Result {
  std::string local_path;   // this rank's node's copy (the source itself for `none`)
  std::string hash_hex;     // XXH3-128, 32 hex digits; empty for `none`
  std::uint64_t bytes = 0;  // image size
  double seconds = 0;       // wall time of the whole stage, on rank 0's clock
  bool skipped = false;     // every node already held a verified copy: nothing moved
  int nodes = 0;            // distinct nodes among the ranks
  // Added for the CLI and cleanup (deploy may ignore them):
  int nodes_copied = 0;                 // nodes that got a new copy in this run (broadcast, sbcast or hard link)
  std::string private_dir;              // this node's private directory; empty for `none`
  bool leader = false;                  // this rank does its node's file work (and its cleanup)
  int node = 0;                         // this rank's node: an index into node_names
  std::vector<std::string> node_names;  // every node, in order of their first rank
  std::vector<std::string> node_paths;  // the staged path on each of them
};

// Collective over `comm`; rank 0 of `comm` reads the source. Throws
// lhpc::Error on every rank with the same code: image (4) for a source that
// is not a readable SIF or changed while staging, stage (7) when a node
// failed (named, with its reason), usage (2) for options that cannot work
// (sbcast outside Slurm, per-node sif_path with sbcast), 130/143 when
// interrupted.
Result stage_image(MPI_Comm comm, const Options& o);

// Collective: node leaders remove what stage put there (the image, its
// record, stale partials) and the private directory when that leaves it
// empty. Nothing for `none`. Throws Error(stage) naming nodes that failed.
void cleanup(MPI_Comm comm, const Result& r);

// Collective: the cleanup of a stage run before (`stage --cleanup`): removes
// o.source's base name from this job's private directory on every node.
void cleanup(MPI_Comm comm, const Options& o);

}  // namespace lhpc::stage
