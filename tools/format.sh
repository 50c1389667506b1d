#!/usr/bin/env bash
# Formats (or with --check, checks) every C++ file git tracks with clang-format 14
# and .clang-format. Run as `meson compile -C build format`; CI runs the check as
# the `lint/format` test.   tools/format.sh [--check]
set -euo pipefail
cd "$(dirname "$0")/.."
fmt=$(command -v clang-format-14 || command -v clang-format || true)
[ -n "$fmt" ] || { echo "format.sh: needs clang-format 14 (apt-get install clang-format)" >&2; exit 2; }
mapfile -t files < <(git ls-files '*.cc' '*.h' '*.cpp')
if [ "${1:-}" = --check ]; then
  out=$(mktemp)
  trap 'rm -f "$out"' EXIT
  if ! "$fmt" --dry-run --Werror "${files[@]}" 2>"$out"; then
    grep -E '^[^ ].*: (error|warning):' "$out" | cut -d: -f1 | sort | uniq -c | sed 's/^/format.sh: lines to reformat in /' >&2
    echo "format.sh: run 'meson compile -C build format' (or tools/format.sh) and commit the result" >&2
    exit 1
  fi
  echo "format.sh: ${#files[@]} files follow .clang-format"
else
  "$fmt" -i "${files[@]}"
fi
