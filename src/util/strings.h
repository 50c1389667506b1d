// Small string helpers shared by every concern.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace lhpc {

std::vector<std::string> split(std::string_view s, char sep);
std::string join(const std::vector<std::string>& parts, std::string_view sep);
std::string trim(std::string_view s);
bool starts_with(std::string_view s, std::string_view prefix);
// For log lines only: quotes an argv element when it holds shell-special characters.
std::string shell_quote(std::string_view s);
std::string join_argv(const std::vector<std::string>& argv);
// Text someone else chose (a message id, an action, a handler's output) on
// its way to a log or a terminal: C0 controls, DEL, C1 controls (U+0080 to
// U+009F: CSI, OSC, ...) and bytes that are not UTF-8 become \xNN, so no
// escape sequence reaches the terminal; characters in `keep` (say "\t") and
// printable UTF-8 are kept.
std::string escape_controls(std::string_view s, std::string_view keep = {});
// "1.5 GiB", "12.0 MiB": human sizes for progress and summaries.
std::string human_bytes(double bytes);
// Levenshtein distance, for "did you mean" suggestions.
std::size_t edit_distance(std::string_view a, std::string_view b);

}  // namespace lhpc
