// Files and directories: atomic replacement, private directories, sizes.
// What lithops-hpc keeps on disk (staged images, status files) is trusted
// only inside a directory that is provably ours: the trust rules are here,
// once, and later work goes through directory fds, never the path again.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "util/fd.h"

namespace lhpc {

std::string read_file(const std::string& path);  // throws Error naming the path
// Writes to a new temporary file beside `path` (a random name, O_EXCL and
// O_NOFOLLOW, so nothing planted there is followed or reused), fsyncs,
// renames over it: readers see the old or the new content, never half of either.
void write_file_atomic(const std::string& path, const std::string& data, mode_t mode);
// The same inside an open directory: `name` is one path component.
void write_file_atomic_at(int dir_fd, const std::string& name, const std::string& data, mode_t mode,
                          const std::string& shown_as);

// The trust rules for a directory lithops-hpc keeps things in:
//  - every parent, from /, is a directory owned by root or by us and not
//    writable by group or others unless sticky (/tmp); a symbolic link on the
//    way is followed only when root or we own it (/home -> /gpfs/home), and
//    every directory it leads through is checked the same way;
//  - the directory itself is ours and private ((mode & 077) == 0).
// Opens `path` (absolute) component by component with O_NOFOLLOW|O_DIRECTORY
// and checks each parent; throws Error naming the component, its owner and
// what to do.
UniqueFd open_trusted_dir(const std::string& path);
// The same, creating each missing directory (`mode`, before umask) with
// mkdirat under the one just checked: nothing is created through a link
// another user owns. A relative `path` starts at the current directory.
UniqueFd make_trusted_dir(const std::string& path, mode_t mode = 0755);
// `name` inside the trusted directory `parent_fd` (shown as `shown_as`),
// created 0700 when missing and `create`; ours and private, else Error
// naming the owner. A directory of ours that only others can read is
// narrowed to 0700; one that others can write is refused. `created` tells
// whether this call made it.
UniqueFd open_private_dir_at(int parent_fd, const std::string& name, const std::string& shown_as, bool create,
                             bool* created = nullptr);
// Both: `path`'s parents trusted, `path` itself private (created with any
// missing parents, those 0755). Returns its fd for later work.
UniqueFd open_private_dir(const std::string& path, bool create = true, bool* created = nullptr);
// Who may own a file whose content steers lithops-hpc: what it wrote itself
// (status, state) is yours; configuration may also be root's (/etc).
enum class FileOwner { me, me_or_root };
// The content of a file that steers lithops-hpc (configuration, status
// files): every directory on the way passes the parent rules above (a link,
// the file's own name included, is followed only when root or we own it,
// its target checked the same way), and the file is a regular file (never
// opened otherwise: a FIFO does not hang the reader), owned as `who` says,
// not writable by group or others, at most `max` bytes. A relative `path`
// starts at the current directory. nullopt when it (or a directory on the
// way) does not exist; Error naming the file and why otherwise.
std::optional<std::string> read_trusted_file(const std::string& path, std::size_t max, FileOwner who = FileOwner::me);
// The content of `path` when its directory passes open_private_dir (not
// created) and it is a regular file of ours, not a symlink, at most `max`
// bytes; nullopt when missing. Throws Error naming what is wrong (directory
// not trusted, type, owner, mode, size).
std::optional<std::string> read_private_file(const std::string& path, std::size_t max);
// open_private_dir, for callers that go on by path (status files).
void make_private_dir(const std::string& path);
// make_trusted_dir for callers that go on by path.
void mkdirs(const std::string& path, mode_t mode = 0755);
// A path component a job id becomes: not empty, at most 128 characters of
// [A-Za-z0-9._-], not "." or "..". Throws Error(usage) naming `what`.
void check_path_component(const std::string& what, const std::string& value);
// The name of `uid` ("nobody") or its number, for messages.
std::string owner_name(uid_t uid);
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
