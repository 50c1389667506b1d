// Checks on configuration bytes before any parser sees them. toml++ 3.3.0
// (Debian 12) reaches code marked unreachable on some non-ASCII input outside
// strings (upstream issues #190, #295) and asserts on a table header cut by a
// line end: the loader must not depend on its behaviour there, so these inputs
// are refused here with file:line:col. Also used for the Lithops YAML (size,
// UTF-8).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace lhpc::config {

// A configuration file larger than this is refused before it is read whole.
inline constexpr std::size_t k_max_config_bytes = 1 << 20;

// Throws Error(Exit::config) "<source>:<line>:<col>: ..." for: more than
// k_max_config_bytes, a NUL byte, invalid UTF-8 (overlong, surrogate, past
// U+10FFFF, truncated).
void check_text(std::string_view text, const std::string& source);

// check_text, then what TOML allows anyway but toml++ 3.3.0 mishandles:
// non-ASCII outside strings and comments; non-ASCII first after a
// line-ending backslash in a multi-line basic string; '[' or '[[' of a
// table header not followed by a key on the same line.
void check_toml_text(std::string_view text, const std::string& source);

}  // namespace lhpc::config
