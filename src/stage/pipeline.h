// The MPI transfer of stage: a pipelined chain broadcast of one file among
// node leaders. Rank 0 of the communicator reads the source chunk by chunk
// and sends each chunk to rank 1, which forwards it to rank 2 as soon as it
// has it, and so on, every rank writing and hashing what passes through.
// Each link carries the image once, so N nodes take about S/B + (N-1)*c/B
// instead of the (N-1)*S/B or log2(N)*S/B of sending every chunk from rank 0
// (what a per-chunk MPI_Ibcast does for large chunks in Open MPI's libnbc:
// linear up to 4 ranks, binomial above).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "stage/progress.h"
#include "util/error.h"

namespace lhpc::stage {

// Chunks are read, hashed and written in slices that fit a core's L2 cache
// (each byte crosses the memory bus once for hash and write together), and
// the MPI progress engine is poked between slices: Open MPI moves messages
// forward only inside MPI calls.
inline constexpr std::size_t k_slice = std::size_t{256} << 10;

struct ChainEnds {
  int src_fd = -1;       // rank 0: the source, read with pread
  std::string src_path;  // for messages
  int out_fd = -1;       // this rank's partial file, or -1 (rank 0 without a copy of its own)
  std::string out_path;  // removed when the transfer stalls
};

struct Transfer {
  std::optional<Error> error;  // this rank's failure (a signal is one too)
  bool stopped = false;        // stopped because another rank failed; that rank names the reason
  std::string hash;            // XXH3-128 of the bytes this rank read (root) or wrote
  bool going() const { return !error && !stopped; }
};

// Collective over `x` (the ranks of the transfer, rank 0 the reader).
// Stopping together: after each chunk every rank posts a non-blocking
// allreduce of its state (1 once it failed or was signalled); before chunk i a
// rank waits for the one of chunk i-W. W covers the chain's depth, so the
// agreement never throttles the pipeline, and every rank that sees "stop"
// stops before the same chunk, so no message is left unmatched. A wait
// longer than `stall_timeout` (0: none) ends the job (exit 7).
// `tick` (may be empty) runs while a rank waits or is throttled, and after each chunk.
Transfer broadcast_file(MPI_Comm x, const ChainEnds& ends, std::uint64_t size, std::size_t chunk, double stall_timeout,
                        Progress* progress, const std::function<void()>& tick = {});

// A step of the transfer waited past its stall deadline: removes `partial`
// (when not empty), logs whom it waited for, ends the job with MPI_Abort.
[[noreturn]] void abandon_stalled(const std::string& partial, const std::string& what, double seconds);

}  // namespace lhpc::stage
