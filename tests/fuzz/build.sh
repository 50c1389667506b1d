#!/usr/bin/env bash
# Configures (once) and builds the libFuzzer harnesses with clang in their
# own build directory, apart from the g++ build. Prints nothing but meson's
# output; exits 77 (SKIP for meson test) when clang or its libFuzzer runtime
# is missing, naming the Debian packages to install.
# Usage: tests/fuzz/build.sh [BUILD_DIR]   (default: build-fuzz)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/build-fuzz}
cxx=${LHPC_FUZZ_CXX:-clang++}
if ! command -v "$cxx" >/dev/null; then
  echo "SKIP: $cxx not found; install clang and libclang-rt-14-dev (deploy/install-deps.sh does)" >&2
  exit 77
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' >"$probe/p.cc"
if ! "$cxx" -fsanitize=fuzzer,address,undefined "$probe/p.cc" -o "$probe/p" 2>"$probe/err"; then
  echo "SKIP: $cxx cannot link a libFuzzer harness (install libclang-rt-14-dev):" >&2
  cat "$probe/err" >&2
  exit 77
fi
if [ ! -f "$dir/build.ninja" ]; then
  (cd "$root" && CXX=$cxx meson setup "$dir" -Dfuzz=true -Dtests=false) >/dev/null
fi
meson compile -C "$dir" fuzz-targets
