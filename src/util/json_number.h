// The one rule for numbers in JSON that lithops-hpc reads back (status and
// state files, records, messages, handler replies, engine output), for every
// reader: nlohmann's get<int>() of a float outside int's range (1e20) is
// undefined behaviour, and get<unsigned>() of -1 wraps to a huge count, so no
// reader calls get<> on a number itself. This is not a parser (nlohmann is)
// and says nothing about which keys a file has.
//  - An integer field takes a JSON integer (no fraction, no exponent: 5, not
//    5.0 or 5e0) inside the range of the C++ type it lands in; anything else
//    is not a value of that field.
//  - A real field takes any JSON number: JSON has no NaN or infinity, and
//    nlohmann refuses a literal that overflows a double (1e400) while parsing.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

namespace lhpc {

// `v` as a T, or nullopt when it is not a JSON integer within T's range.
template <class T, class Json>
std::optional<T> json_integer(const Json& v) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>, "an integer type");
  if (v.is_number_unsigned()) {
    auto u = v.template get<std::uint64_t>();
    return std::in_range<T>(u) ? std::optional<T>(static_cast<T>(u)) : std::nullopt;
  }
  if (v.is_number_integer()) {
    auto s = v.template get<std::int64_t>();
    return std::in_range<T>(s) ? std::optional<T>(static_cast<T>(s)) : std::nullopt;
  }
  return std::nullopt;
}

// `v` as a double, or nullopt when it is not a number.
template <class Json>
std::optional<double> json_real(const Json& v) {
  return v.is_number() ? std::optional<double>(v.template get<double>()) : std::nullopt;
}

// The words a reader's message uses for a value the rule refused: "is not an
// integer from 0 to 4294967295".
template <class T>
std::string json_integer_rule() {
  return "is not an integer from " + std::to_string(std::numeric_limits<T>::min()) + " to " +
         std::to_string(std::numeric_limits<T>::max());
}

}  // namespace lhpc
