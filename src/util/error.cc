#include "util/error.h"

#include <cstring>

namespace lhpc {

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace lhpc
