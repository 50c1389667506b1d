#include "config/lithops_yaml_edit.h"

#include <yaml-cpp/yaml.h>

#include <optional>
#include <set>

#include "config/text_guard.h"
#include "util/error.h"

namespace lhpc::config {

namespace {

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at < text.size()) {
    auto nl = text.find('\n', at);
    if (nl == std::string::npos) {
      out.push_back(text.substr(at));
      break;
    }
    out.push_back(text.substr(at, nl - at));
    at = nl + 1;
  }
  return out;
}

std::size_t indent_of(const std::string& line) { return line.find_first_not_of(' '); }

bool blank_or_comment(const std::string& line) {
  auto i = line.find_first_not_of(" \t\r");
  return i == std::string::npos || line[i] == '#';
}

// `name:` at `indent`, then a space, a comment or the end of the line.
bool is_key_line(const std::string& line, std::size_t indent, const std::string& name) {
  if (indent_of(line) != indent || line.compare(indent, name.size(), name) != 0) {
    return false;
  }
  auto rest = line.substr(indent + name.size());
  return rest == ":" || rest.rfind(": ", 0) == 0 || rest.rfind(":\t", 0) == 0 || rest == ":\r";
}

// Nothing but an optional comment after `section:`: a block mapping follows.
bool opens_block(const std::string& line, const std::string& name) {
  auto rest = line.substr(name.size() + 1);
  auto i = rest.find_first_not_of(" \t\r");
  return i == std::string::npos || rest[i] == '#';
}

std::string yaml_quote(const std::string& v) {
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') {
      out += '\\';
    }
    out += c;
  }
  return out + "\"";
}

std::string value_text(const YamlSet& s) { return s.quoted ? yaml_quote(s.value) : s.value; }

// One key set by editing lines; false when the layout is beyond it.
bool set_in_lines(std::vector<std::string>& lines, const YamlSet& s) {
  std::optional<std::size_t> head;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    if (is_key_line(lines[i], 0, s.section)) {
      if (!opens_block(lines[i], s.section) || head) {
        return false;  // `lithops: {...}`, `lithops: null`, or the section twice
      }
      head = i;
    }
  }
  if (!head) {
    lines.push_back(s.section + ":");
    lines.push_back("  " + s.key + ": " + value_text(s));
    return true;
  }
  // The block: every line after the head until one at column 0 that is not
  // blank or a comment. Its keys are at the indent of its first key.
  std::size_t end = *head + 1;
  std::size_t child = 0;
  std::size_t last_child_line = *head;
  for (; end < lines.size(); ++end) {
    const auto& l = lines[end];
    if (blank_or_comment(l)) {
      continue;
    }
    auto ind = indent_of(l);
    if (ind == 0) {
      break;
    }
    if (child == 0) {
      child = ind;
    }
    if (ind < child || l[ind] == '-') {
      return false;  // uneven indentation, or a list where a mapping belongs
    }
    last_child_line = end;
  }
  if (child == 0) {
    child = 2;
  }
  std::string fresh = std::string(child, ' ') + s.key + ": " + value_text(s);
  for (std::size_t i = *head + 1; i < end; ++i) {
    if (is_key_line(lines[i], child, s.key)) {
      // Drop the old value's continuation lines (a block scalar, a wrapped string).
      std::size_t j = i + 1;
      while (j < end && (lines[j].find_first_not_of(" \t\r") == std::string::npos || indent_of(lines[j]) > child)) {
        ++j;
      }
      while (j > i + 1 && lines[j - 1].find_first_not_of(" \t\r") == std::string::npos) {
        --j;  // blank lines after the value belong to the layout, not to it
      }
      lines.erase(lines.begin() + static_cast<long>(i) + 1, lines.begin() + static_cast<long>(j));
      lines[i] = fresh;
      return true;
    }
  }
  lines.insert(lines.begin() + static_cast<long>(last_child_line) + 1, fresh);
  return true;
}

std::string join_lines(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) {
    out += l + "\n";
  }
  return out;
}

YAML::Node load_map(const std::string& text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw Error(Exit::config,
                source + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) + ": " + e.msg,
                "fix the YAML syntax at that position");
  }
  if (!root || root.IsNull()) {
    return YAML::Node(YAML::NodeType::Map);
  }
  if (!root.IsMap()) {
    throw Error(Exit::config, source + ": the Lithops config must be a mapping of sections",
                "write it as `lithops:`, `rabbitmq:` ... each with its keys indented below");
  }
  return root;
}

bool is_set(const std::vector<YamlSet>& sets, const std::string& section, const std::string& key) {
  for (const auto& s : sets) {
    if (s.section == section && s.key == key) {
      return true;
    }
  }
  return false;
}

// Every key of `before` but the ones set is in `after` unchanged, `after` has
// nothing else, and the keys set read back as asked.
bool same_but_set(const YAML::Node& before, const YAML::Node& after, const std::vector<YamlSet>& sets) {
  std::set<std::string> seen;
  for (const auto& sec : before) {
    auto name = sec.first.as<std::string>();
    seen.insert(name);
    auto a = after[name];
    if (!a) {
      return false;
    }
    if (!sec.second.IsMap() || !a.IsMap()) {
      if (YAML::Dump(sec.second) != YAML::Dump(a)) {
        return false;
      }
      continue;
    }
    for (const auto& kv : sec.second) {
      auto key = kv.first.as<std::string>();
      if (!is_set(sets, name, key) && (!a[key] || YAML::Dump(kv.second) != YAML::Dump(a[key]))) {
        return false;
      }
    }
    for (const auto& kv : a) {
      auto key = kv.first.as<std::string>();
      if (!sec.second[key] && !is_set(sets, name, key)) {
        return false;
      }
    }
  }
  for (const auto& sec : after) {
    auto name = sec.first.as<std::string>();
    if (seen.count(name)) {
      continue;
    }
    if (!sec.second.IsMap()) {
      return false;
    }
    for (const auto& kv : sec.second) {
      if (!is_set(sets, name, kv.first.as<std::string>())) {
        return false;
      }
    }
  }
  for (const auto& s : sets) {
    auto v = after[s.section][s.key];
    if (!v || !v.IsScalar() || v.Scalar() != s.value) {
      return false;
    }
  }
  return true;
}

}  // namespace

YamlEdit set_lithops_keys(const std::string& text, const std::vector<YamlSet>& sets, const std::string& source) {
  check_text(text, source);
  auto before = load_map(text, source);
  auto lines = split_lines(text);
  bool ok = true;
  for (const auto& s : sets) {
    ok = ok && set_in_lines(lines, s);
  }
  if (ok) {
    auto edited = join_lines(lines);
    try {
      if (same_but_set(before, YAML::Load(edited), sets)) {
        return {edited, false};
      }
    } catch (const YAML::Exception&) {
      // the line edit broke the layout: write it with yaml-cpp below
    }
  }
  auto root = YAML::Clone(before);
  for (const auto& s : sets) {
    if (!root[s.section] || !root[s.section].IsMap()) {
      root[s.section] = YAML::Node(YAML::NodeType::Map);
    }
    root[s.section][s.key] = s.value;
  }
  YAML::Emitter out;
  out << root;
  return {std::string(out.c_str()) + "\n", true};
}

}  // namespace lhpc::config
