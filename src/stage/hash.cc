#include "stage/hash.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <new>

#include "util/error.h"
#include "util/fd.h"

namespace lhpc::stage {

std::string to_hex(const XXH128_hash_t& h) {
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, h);
  static const char k_digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(32);
  for (unsigned char b : c.digest) {
    out += k_digits[b >> 4];
    out += k_digits[b & 0xf];
  }
  return out;
}

Hasher::Hasher() : m_state(XXH3_createState()) {
  if (m_state == nullptr) {
    throw std::bad_alloc();
  }
  XXH3_128bits_reset(m_state);
}

Hasher::~Hasher() { XXH3_freeState(m_state); }

void Hasher::update(const void* data, std::size_t n) { XXH3_128bits_update(m_state, data, n); }

XXH128_hash_t Hasher::digest() const { return XXH3_128bits_digest(m_state); }

XXH128_hash_t hash_file(const std::string& path, std::size_t buf_bytes, const std::function<void()>& between) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    throw Error(Exit::failure, "cannot read " + path + ": " + errno_text(errno));
  }
  return hash_fd(fd.get(), path, buf_bytes, between);
}

XXH128_hash_t hash_fd(int fd, const std::string& shown_as, std::size_t buf_bytes,
                      const std::function<void()>& between) {
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  auto buf = std::make_unique_for_overwrite<char[]>(buf_bytes);
  Hasher h;
  for (off_t off = 0;;) {
    ssize_t n = ::pread(fd, buf.get(), buf_bytes, off);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error(Exit::failure, "cannot read " + shown_as + ": " + errno_text(errno));
    }
    if (n == 0) {
      break;
    }
    off += n;
    h.update(buf.get(), static_cast<std::size_t>(n));
    if (between) {
      between();
    }
  }
  return h.digest();
}

}  // namespace lhpc::stage
