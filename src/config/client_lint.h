// Client-side checks of `config check`: settings in the user's Lithops config
// that make the Lithops client fail late and far from the cause. Each check
// mirrors what Lithops itself does (the .cc names the place in its source)
// and says the fix. Facts that need I/O (Python versions) come in as values,
// so the checks are pure and tested as data.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "config/config.h"

namespace lhpc::config {

struct Finding {
  enum class Level { note, warning };
  Level level = Level::warning;
  std::string text;
};

struct ClientFacts {
  std::string image;                         // the image the workers run; empty: none configured
  std::optional<std::string> client_python;  // "3.11" of the client's python3; nullopt: unknown
  std::optional<std::string> image_python;   // "3.11" from the image's metadata; nullopt: unknown
  std::string image_python_why;              // why image_python is unknown (printed as a note)
};

std::vector<Finding> lint_client(const Config& cfg, const ClientFacts& facts);

// major.minor of `python3` on PATH (the interpreter the Lithops client most
// likely runs in), or nullopt when it cannot be run.
std::optional<std::string> client_python_version();

// The image's Python major.minor from its metadata: the SIF's labels object
// (JSON) or its definition file (%labels org.lithops-hpc.python-version, else
// `From: python:X.Y`). nullopt with *why set when the image does not say.
std::optional<std::string> image_python_version(const std::string& sif_path, std::string* why);
// The definition-file part of the above, on text.
std::optional<std::string> python_version_from_deffile(const std::string& def);

}  // namespace lhpc::config
