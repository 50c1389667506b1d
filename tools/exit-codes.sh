#!/usr/bin/env bash
# One exit path (CONTRIBUTING.md, Errors): a command returns an lhpc::Exit or
# throws lhpc::Error, and only src/main.cc turns either into the process's
# number; MpiSession::abort (src/util/mpi.cc) is the one other way out, for a
# job that cannot return to main, and it takes an Exit too. The compiler holds
# the commands to returning Exit; this check (the lint/exit-codes test) finds
# the ways around it. Fails, naming file:line, when a file in src/ other than
# those two
#   - makes a number of an exit code: static_cast<int>(Exit::...) or of an
#     Error's code(),
#   - makes an exit code of a number: static_cast<Exit>(...),
#   - ends the process itself: exit, _exit, _Exit, quick_exit, std::abort, MPI_Abort.
# A line that ends a process whose status is not ours (a forked child, a test
# hook's simulated crash) says so with `// exit-codes: <why>`.
#   tools/exit-codes.sh [DIR]   (DIR: a source tree; default: this repository)
set -euo pipefail
root=${1:-"$(dirname "$0")/.."}
cd "$root"
status=0
check() {  # check RULE ERE [ALLOWED_FILE...]
  local rule=$1 re=$2
  shift 2
  local allowed=" $* "
  while IFS= read -r hit; do
    local file=${hit%%:*}
    [[ $allowed == *" $file "* ]] && continue
    local text=${hit#*:*:}
    [[ $text =~ ^[[:space:]]*// ]] && continue   # a comment line
    [[ $text == *"// exit-codes:"* ]] && continue # said why
    echo "exit-codes: $hit" >&2
    echo "  $rule" >&2
    status=1
  done < <(grep -rnE --include='*.cc' --include='*.h' "$re" src || true)
}
check "an exit code made into a number outside main.cc: return the Exit, or throw an Error" \
  'static_cast<int>\((lhpc::)?Exit::|static_cast<int>\([^()]*code\(\)\)' src/main.cc src/util/mpi.cc
check "an exit code made of a number: use an Exit value" \
  'static_cast<(lhpc::)?Exit>' src/util/mpi.cc
check "the process ended outside main.cc: return an Exit, throw an Error, or MpiSession::abort(Exit)" \
  '(^|[^A-Za-z0-9_.>:])(std::|::)?(exit|_exit|_Exit|quick_exit)\(|std::abort\(|MPI_Abort\(' \
  src/main.cc src/util/mpi.cc
if [ "$status" = 0 ]; then
  echo "exit-codes: only src/main.cc and MpiSession::abort make exit statuses"
fi
exit "$status"
