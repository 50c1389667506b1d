// `runtime build` below the command line: the checks that run before the
// engine (runtime name, definition file, image directory, existing image),
// the engine's supervision (signals passed on), and removal of the partial
// image a failed or interrupted build leaves. Kept apart from the CLI so each
// rule is testable with a stand-in engine and no argument parsing.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "container/engine.h"

namespace lhpc::container {

// Runtime names are file names (Lithops maps singularity.runtime to
// <sif_path>/<runtime>.sif). Throws Error(usage) for separators, a leading
// '-' or '.', more than 200 characters, or a trailing ".sif".
void check_runtime_name(const std::string& name);

// The definition file to build from, absolute: `given`, or the bundled
// runtime-defs/lithops-default.def when `given` is empty. Throws Error(usage)
// when `given` is missing or not a readable regular file, Error(failure)
// when the bundled one is missing.
std::string resolve_definition(const std::string& given);

// Throws Error(failure) unless `dir` is a directory we may create files in;
// `origin` ("--sif-path", "singularity.sif_path in FILE") goes in the message.
void check_image_dir(const std::string& dir, const std::string& origin);

struct BuildRequest {
  std::string name;           // runtime name: the image is <dir>/<name>.sif
  std::string def;            // definition file; empty: the bundled one
  std::string dir;            // image directory, placeholders already expanded
  std::string dir_origin;     // where `dir` came from, for messages
  std::string config_source;  // the configuration file naming the engine ("" : defaults)
  bool fakeroot = false;
  bool force = false;  // replace an existing image
  // Labels the image gets besides the definition's ("KEY", "VALUE"), e.g.
  // org.lithops-hpc.gpus-per-slot: built from a copy of the definition
  // beside the image with them at the end of its first %labels section.
  std::vector<std::pair<std::string, std::string>> labels;
};

// `def` with `labels` as "    KEY VALUE" lines at the end of its first
// %labels section (after the definition's own: the build keeps the last of
// a key), or in a %labels section of their own at its end. Throws
// Error(usage) for a key or value that would not survive the line (empty, a
// newline, a space in the key).
std::string with_labels(const std::string& def, const std::vector<std::pair<std::string, std::string>>& labels);

struct BuiltImage {
  std::string path;
  std::uint64_t bytes = 0;
};

// Checks everything, then runs the engine's build in the foreground (its
// output streams through; SIGINT/SIGTERM/SIGHUP are passed on so it can clean
// up). A failed or interrupted build that created or changed the image has it
// removed, so no half image is left to stage. Throws Error: usage/failure/
// config from the checks, engine when the build failed, 128+signal when a
// signal ended it.
BuiltImage build_image(Engine& engine, const BuildRequest& req);

}  // namespace lhpc::container
