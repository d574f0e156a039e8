# What both recipes check before they start (sourced): "recipe_start OUTPUT_DIR FILE..." moves to the
# repository, refuses a missing input file or a non-empty output folder, and sets $python, $work (a temporary
# folder, removed on exit) and SECONDS. Environment: PYTHON (default python).
recipe_start() {
  local out=$1; shift
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  python=${PYTHON:-python}
  for f in "$@"; do
    [ -f "$f" ] || { echo "error: $f not found (set SHARED to the Doc2Dial folder)" >&2; exit 2; }
  done
  if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "error: $out exists and is not empty; choose another folder" >&2; exit 2
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  SECONDS=0
}
