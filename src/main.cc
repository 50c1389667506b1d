// lithops-hpc: forwards to the CLI; the one place errors become messages and exit codes.
#include <spdlog/spdlog.h>

#include <exception>

#include "cli/cli.h"
#include "util/error.h"

int main(int argc, char** argv) {
  try {
    return lhpc::cli::run(argc, argv);
  } catch (const lhpc::Error& e) {
    spdlog::error("{}", e.what());
    if (!e.hint().empty()) {
      spdlog::error("hint: {}", e.hint());
    }
    return static_cast<int>(e.code());
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return static_cast<int>(lhpc::Exit::failure);
  }
}
