// The names of an enum's values, written once in one small table: to text,
// from text, and the refusal that lists the choices. Every enum that becomes
// text (configuration values, health states) goes through one of these, so a
// name is spelled in one place and a bad one is refused in the same words
// wherever it was written.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace lhpc {

template <typename E, std::size_t N>
class Names {
public:
  constexpr explicit Names(std::array<std::pair<E, std::string_view>, N> all) : m_all(all) {}

  // The value's name; "unknown" for a value outside the table (only a byte
  // from the wire can be one: a health report of another build).
  constexpr std::string_view text(E e) const {
    for (const auto& [value, name] : m_all) {
      if (value == e) {
        return name;
      }
    }
    return "unknown";
  }
  constexpr std::optional<E> parse(std::string_view name) const {
    for (const auto& [value, text] : m_all) {
      if (text == name) {
        return value;
      }
    }
    return std::nullopt;
  }
  // "a, b, c", in the table's order.
  std::string list() const {
    std::string out;
    for (const auto& [value, name] : m_all) {
      out += (out.empty() ? "" : ", ") + std::string(name);
    }
    return out;
  }
  // Empty when `name` is one of the values, else the refusal every reader
  // uses: "'x' is not one of a, b, c".
  std::string error(std::string_view name) const {
    return parse(name) ? std::string() : "'" + std::string(name) + "' is not one of " + list();
  }

private:
  std::array<std::pair<E, std::string_view>, N> m_all;
};

}  // namespace lhpc
