// XXH3-128 of files and streams: what stage compares to decide that a copy
// on a node is the image rank 0 read. Not a cryptographic hash: it detects
// corruption and truncation, not tampering (the private 0700 directory does
// that part).
#pragma once

#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace lhpc::stage {

// 32 lowercase hex digits, XXH128's canonical (big-endian) form: the same
// text `xxh128sum` prints.
std::string to_hex(const XXH128_hash_t& h);

// Streaming XXH3-128; one per file being written or read.
class Hasher {
public:
  Hasher();
  ~Hasher();
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;

  void update(const void* data, std::size_t n);
  XXH128_hash_t digest() const;
  std::string hex() const { return to_hex(digest()); }

private:
  XXH3_state_t* m_state;
};

// Hashes the whole file at `path`, reading `buf_bytes` at a time. `between`
// runs after each read and may throw to stop (signals). Throws
// Error(Exit::failure) naming the path when it cannot be read.
XXH128_hash_t hash_file(const std::string& path, std::size_t buf_bytes = 8u << 20,
                        const std::function<void()>& between = {});
// The same for an open file, from its start (shown_as names it in errors).
XXH128_hash_t hash_fd(int fd, const std::string& shown_as, std::size_t buf_bytes = 8u << 20,
                      const std::function<void()>& between = {});

}  // namespace lhpc::stage
