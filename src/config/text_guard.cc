#include "config/text_guard.h"

#include <cstdio>

#include "util/error.h"

namespace lhpc::config {

namespace {

struct Pos {
  std::size_t line = 1;
  std::size_t col = 1;
};

[[noreturn]] void refuse(const std::string& source, Pos p, const std::string& what, const std::string& hint) {
  throw Error(Exit::config, source + ":" + std::to_string(p.line) + ":" + std::to_string(p.col) + ": " + what, hint);
}

// Bytes of the UTF-8 sequence starting at s[i]; 0 when it is not valid UTF-8.
std::size_t utf8_length(std::string_view s, std::size_t i) {
  auto byte = [&s](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = byte(i);
  if (c < 0x80) {
    return 1;
  }
  std::size_t n = 0;
  char32_t cp = 0;
  char32_t min = 0;
  if ((c & 0xE0) == 0xC0) {
    n = 2, cp = c & 0x1F, min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, cp = c & 0x0F, min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, cp = c & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (i + n > s.size()) {
    return 0;
  }
  for (std::size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) {
      return 0;
    }
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  return n;
}

bool is_ascii(char c) { return static_cast<unsigned char>(c) < 0x80; }

// A character of a bare key or of a number, date or boolean: no quote may follow it.
bool is_bare(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
         c == '+' || c == ':';
}

bool ends_bare_value(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == ',' || c == ']' || c == '}' || c == '#';
}

bool starts_key(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
         c == '"' || c == '\'';
}

// A small scanner that knows just enough TOML (strings, comments, values,
// headers) to tell where toml++ 3.3.0 would classify a non-ASCII character.
class TomlScan {
public:
  TomlScan(std::string_view t, const std::string& source) : m_t(t), m_src(source) {}

  void run() {
    while (m_i < m_t.size()) {
      switch (m_state) {
        case State::normal: normal(); break;
        case State::comment: comment(); break;
        case State::basic: basic(); break;
        case State::literal: literal(); break;
        case State::ml_basic: ml_basic(); break;
        case State::ml_literal: ml_literal(); break;
      }
    }
  }

private:
  enum class State { normal, comment, basic, literal, ml_basic, ml_literal };

  char at(std::size_t k) const { return m_i + k < m_t.size() ? m_t[m_i + k] : '\0'; }
  bool ahead(std::string_view s) const { return m_t.substr(m_i, s.size()) == s; }

  // Moves past one code point (check_text already vouched for the UTF-8).
  void step() {
    if (m_t[m_i] == '\n') {
      ++m_pos.line;
      m_pos.col = 1;
    } else {
      ++m_pos.col;
    }
    m_i += utf8_length(m_t, m_i);
  }
  void step(std::size_t n) {
    for (std::size_t k = 0; k < n && m_i < m_t.size(); ++k) {
      step();
    }
  }

  void normal() {
    char c = m_t[m_i];
    if (!is_ascii(c)) {
      refuse(m_src, m_pos, "non-ASCII character outside a string or a comment",
             "TOML allows it only between quotes or after '#'");
    }
    // toml++ reads a value that starts with a bare character (a number, a
    // date, a boolean, or garbage such as 0"..., 0)"...) to the next blank,
    // ',', ']', '}', '#' or line end before it judges it: quotes and braces
    // inside that run open nothing, and non-ASCII in it is refused above.
    if (m_bare_value && !ends_bare_value(c)) {
      m_last = c;
      step();
      return;
    }
    m_bare_value = m_last == '=' && is_bare(c);
    // A quote right after a bare key or value character (0"..., a"...) opens
    // no string in TOML: toml++ does not scan what follows as one, so neither
    // do we (non-ASCII there is outside a string).
    if ((c == '"' || c == '\'') && is_bare(m_last)) {
      m_last = c;
      step();
      return;
    }
    if (c != ' ' && c != '\t' && c != '\r') {
      m_last = c;
    }
    switch (c) {
      case '#': m_state = State::comment; break;
      case '"':
        m_state = ahead("\"\"\"") ? State::ml_basic : State::basic;
        step(m_state == State::ml_basic ? 2 : 0);
        break;
      case '\'':
        m_state = ahead("'''") ? State::ml_literal : State::literal;
        step(m_state == State::ml_literal ? 2 : 0);
        break;
      case '\n': m_in_value = m_depth > 0; break;
      case '=': m_in_value = m_in_value || m_depth == 0; break;
      case '[':
        if (!m_in_value) {
          header();
          return;
        }
        ++m_depth;
        break;
      case '{': m_depth += m_in_value ? 1 : 0; break;
      case ']':
      case '}': m_depth -= m_in_value && m_depth > 0 ? 1 : 0; break;
      default: break;
    }
    step();
  }

  // toml++ 3.3.0 asserts when a table header's '[' is not followed by a key.
  void header() {
    step(at(1) == '[' ? 2 : 1);
    while (at(0) == ' ' || at(0) == '\t') {
      step();
    }
    if (!starts_key(at(0))) {
      refuse(m_src, m_pos, "a table header needs a name after '['", "write [section] on one line");
    }
  }

  void comment() {
    if (m_t[m_i] == '\n') {
      m_state = State::normal;  // the line end is the normal state's
      return;
    }
    step();
  }

  void basic() {
    char c = m_t[m_i];
    if (c == '\\') {
      step();
    } else if (c == '"' || c == '\n') {
      m_state = State::normal;
      if (c == '\n') {
        return;
      }
    }
    step();
  }

  void literal() {
    char c = m_t[m_i];
    if (c == '\'' || c == '\n') {
      m_state = State::normal;
      if (c == '\n') {
        return;
      }
    }
    step();
  }

  void ml_basic() {
    if (ahead("\"\"\"")) {
      close_ml('"');
      return;
    }
    if (m_t[m_i] != '\\') {
      step();
      return;
    }
    std::size_t k = 1;
    while (at(k) == ' ' || at(k) == '\t') {
      ++k;
    }
    if (at(k) != '\n' && !(at(k) == '\r' && at(k + 1) == '\n')) {
      step(2);  // an ordinary escape
      return;
    }
    step(k);
    while (at(0) == ' ' || at(0) == '\t' || at(0) == '\n' || at(0) == '\r') {
      step();
    }
    if (m_i < m_t.size() && !is_ascii(m_t[m_i])) {
      refuse(m_src, m_pos, "non-ASCII character right after a line-ending backslash in a \"\"\" string",
             "write it as a \\u escape (e.g. \\u00A7), or end the previous line without the backslash");
    }
  }

  void ml_literal() {
    if (ahead("'''")) {
      close_ml('\'');
      return;
    }
    step();
  }

  // """ or ''' ends the string; up to two more quotes belong to its content.
  void close_ml(char q) {
    step(3);
    for (int extra = 0; extra < 2 && at(0) == q; ++extra) {
      step();
    }
    m_state = State::normal;
  }

  std::string_view m_t;
  const std::string& m_src;
  std::size_t m_i = 0;
  Pos m_pos;
  State m_state = State::normal;
  bool m_in_value = false;
  int m_depth = 0;
  char m_last = '\n';         // the last character seen outside strings, blanks aside
  bool m_bare_value = false;  // inside a value toml++ reads as one bare run (see normal())
};

}  // namespace

void check_text(std::string_view text, const std::string& source) {
  if (text.size() > k_max_config_bytes) {
    throw Error(Exit::config,
                source + ": " + std::to_string(text.size()) + " bytes is more than a configuration file may hold (" +
                    std::to_string(k_max_config_bytes) + ")",
                "point the configuration at the right file");
  }
  Pos pos;
  for (std::size_t i = 0; i < text.size();) {
    if (text[i] == '\0') {
      refuse(source, pos, "NUL byte", "a configuration file is UTF-8 text");
    }
    auto n = utf8_length(text, i);
    if (n == 0) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned char>(text[i]));
      refuse(source, pos, std::string("invalid UTF-8 (byte ") + hex + ")", "save the file as UTF-8");
    }
    if (text[i] == '\n') {
      ++pos.line;
      pos.col = 1;
    } else {
      ++pos.col;
    }
    i += n;
  }
}

void check_toml_text(std::string_view text, const std::string& source) {
  check_text(text, source);
  TomlScan(text, source).run();
}

}  // namespace lhpc::config
