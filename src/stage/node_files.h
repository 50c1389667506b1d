// Stage's file work on one node, done by the node's leader rank: the private
// directory and its node marker, the partial file, the rename into place
// with its hash record, stale partials, and the removal of it all.
//
// Trust: sif_path is opened as a trusted directory (util/fs.h: no symlink,
// parents root's or ours and not writable by others unless sticky) and the
// private directory in it only when it is ours and private; a directory
// someone else made is refused, never read. Everything after that goes
// through the two directory fds, never through the path again.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "util/fd.h"

namespace lhpc::stage {

// A leader's private directory and what it created in this run; removed
// again unless committed.
struct NodeWork {
  std::string sif_dir;  // sif_path on this node
  UniqueFd sif_fd;      // sif_path, trusted (once it exists)
  std::string dir;      // <sif_path>/lithops-hpc-<uid>-<jobid>, for messages and the result
  UniqueFd dir_fd;      // the private directory, once it exists and was checked
  bool made_dir = false;
  std::string marker;   // name, set only when this run created it
  std::string partial;  // full path (sbcast writes by path); its name is under dir_fd
  UniqueFd fd;
  bool committed = false;

  NodeWork() = default;
  NodeWork(const NodeWork&) = delete;
  NodeWork& operator=(const NodeWork&) = delete;
  ~NodeWork();
  std::string name() const;  // the private directory's name in sif_path
};

// Phase B: opens sif_path (trusted) and this job's private directory when it
// exists (ours and private, else Error(stage) naming its owner).
void open_node_dir(NodeWork& nw, const std::string& sif_dir, const std::string& jobid);

// A verified copy named `image` in the private directory: its record's hash.
std::optional<std::string> verified_hash(const NodeWork& nw, const std::string& image);

// Verified copies of the same image name in this user's private directories
// of earlier jobs under the same sif_path (a re-deploy is a new job), as
// [{path, hash}], at most 8. Only directories that are ours and private count.
nlohmann::json sibling_copies(const NodeWork& nw, const std::string& image);

// The private directory (created when missing) and a marker naming `node` in it.
void prepare_private_dir(NodeWork& nw, const std::string& node);
// Refuses a directory another node marked too (nodes would write the same file).
void refuse_shared_dir(const NodeWork& nw, const std::string& node);
// Opens a new partial file for the copy, after checking there is room for `size` bytes.
void open_partial(NodeWork& nw, const std::string& staged, std::uint64_t size);
// This node's partial file as a hard link to an earlier job's verified copy
// at `from`. That directory is not this job's: the copy is hashed again, and
// the hash returned, so that it is checked like a transferred one.
std::string link_earlier_copy(NodeWork& nw, const std::string& staged, const std::string& from, std::size_t chunk);
// sbcast's partial on this node: a regular file, made 0600, and its hash.
std::string hash_sbcast_partial(const NodeWork& nw, std::size_t chunk);
// Removes the partial file of this run (sbcast wrote it on a node that needs none).
void drop_partial(NodeWork& nw);
// Renames the verified partial file into place and writes its record.
void commit(NodeWork& nw, const std::string& staged, const std::string& hash, std::uint64_t size,
            const std::string& source);
// Removes partial files of `staged` whose process is gone (and sbcast's when asked).
void remove_stale_partials(const NodeWork& nw, const std::string& staged, bool include_sbcast);
// `stage --cleanup` and deploy's end: the image, its record, stale partials,
// and the directory when only node markers are left in it. The directory
// must be ours and private (Error(stage) naming its owner otherwise).
void remove_staged(const std::string& dir, const std::string& staged);

}  // namespace lhpc::stage
