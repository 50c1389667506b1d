#!/usr/bin/env bash
# Fails when a file git tracks cites a path outside the repository: the team's
# notes that a person who clones the project does not have. What such a file
# said belongs in docs/ (design.md, lithops-protocol.md, test-rig.md) and is
# cited there. CI runs this as the `lint/self-contained` test.
#   tools/check-self-contained.sh [REV]    (default: the working tree's tracked files)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v git >/dev/null && git rev-parse --git-dir >/dev/null 2>&1 ||
  { echo "check-self-contained.sh: needs a git checkout (it checks the files git tracks)" >&2; exit 2; }
# Bracketed first letters: the pattern never matches its own spelling here.
pattern='\.\./[s]hared/|[s]hared/(design|test-rig|lithops-protocol|style|tools)'
if hits=$(git grep -nIE "$pattern" "$@"); then
  echo "$hits" | sed 's/^/check-self-contained.sh: /' >&2
  echo "check-self-contained.sh: these cite files outside the repository; write what they rely on into docs/ and cite that" >&2
  exit 1
fi
echo "check-self-contained.sh: no tracked file cites a path outside the repository"
