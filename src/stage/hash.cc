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

bool equal(const XXH128_hash_t& a, const XXH128_hash_t& b) { return XXH128_isEqual(a, b) != 0; }

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
  ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  auto buf = std::make_unique_for_overwrite<char[]>(buf_bytes);
  Hasher h;
  while (true) {
    ssize_t n = ::read(fd.get(), buf.get(), buf_bytes);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error(Exit::failure, "cannot read " + path + ": " + errno_text(errno));
    }
    if (n == 0) {
      break;
    }
    h.update(buf.get(), static_cast<std::size_t>(n));
    if (between) {
      between();
    }
  }
  return h.digest();
}

}  // namespace lhpc::stage
