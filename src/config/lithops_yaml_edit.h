// Setting a few keys of the user's Lithops config (YAML) without losing what
// else is in it: `lithops-hpc up` writes the broker URL and the store's
// address there. yaml-cpp would drop every comment when it writes the file
// back, so the text is edited line by line (block style, as Lithops documents
// it), and the result is parsed again and compared with the original: the
// keys set hold the values asked for and every other key is unchanged. A
// layout that line editing cannot handle (flow mappings, anchors) is written
// by yaml-cpp instead, without the comments, and the caller is told.
#pragma once

#include <string>
#include <vector>

namespace lhpc::config {

// `section.key: value` at the top level's second level (lithops.backend).
struct YamlSet {
  std::string section;
  std::string key;
  std::string value;
  bool quoted = true;  // false: written plain (a port number)
};

struct YamlEdit {
  std::string text;
  bool comments_lost = false;  // written by yaml-cpp: comments and layout gone
};

// The text with every `sets` entry in place. Throws Error(config) naming
// `source` when the text is not a YAML mapping of sections.
YamlEdit set_lithops_keys(const std::string& text, const std::vector<YamlSet>& sets, const std::string& source);

}  // namespace lhpc::config
