#!/usr/bin/env bash
# Lists the longest functions under the given folders (default: src), longest first,
# as "LINES path:line name", measured by Universal Ctags (apt-get install universal-ctags).
#   tools/function-lengths.sh [-n TOP] [DIR...]
set -euo pipefail
top=15
[ "${1:-}" = -n ] && { top=$2; shift 2; }
[ $# -gt 0 ] || set -- src
command -v ctags >/dev/null || { echo "function-lengths: needs universal-ctags" >&2; exit 2; }
ctags --fields=+ne --c++-kinds=f --c-kinds=f -o - -R "$@" 2>/dev/null |
  awk -F'\t' '{l="";e="";for(i=4;i<=NF;i++){if($i~/^line:/)l=substr($i,6);if($i~/^end:/)e=substr($i,5)}
              if(l!=""&&e!="") print e-l+1, $2":"l, $1}' | sort -rn | head -n "$top"
