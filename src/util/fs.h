// Files and directories: atomic replacement, private directories, sizes.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

namespace lhpc {

std::string read_file(const std::string& path);  // throws Error naming the path
// Writes to a temporary file beside `path`, fsyncs, renames over it: readers
// see the old or the new content, never half of either.
void write_file_atomic(const std::string& path, const std::string& data, mode_t mode);
// Creates `path` (and missing parents, 0755) with the last component 0700,
// refusing a symlink, a directory owned by someone else, or one others can
// write: a place only this user can put an image into.
void make_private_dir(const std::string& path);
void mkdirs(const std::string& path, mode_t mode = 0755);
bool path_exists(const std::string& path);
std::optional<std::uint64_t> file_size(const std::string& path);
void remove_tree(const std::string& path);  // rm -rf; missing is fine
std::string dirname_of(const std::string& path);
std::string basename_of(const std::string& path);
std::string home_dir();
std::string user_name();
// $LITHOPS_HPC_STATE_DIR, else ~/.lithops-hpc (status files, stop requests).
std::string state_dir();

}  // namespace lhpc
