#!/usr/bin/env bash
# Train one model or a sweep on this machine.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [--dry-run] train|sweep|analyze|reproduce ARGS...

Runs `python -m icl_jax ARGS...` from the repository root, with the repo's Python
($ICL_JAX_PYTHON, else .venv/bin/python, else python3).

  launch/local.sh train --config small:layers=2 --workdir runs/2l
  launch/local.sh sweep --config paper_small:attn --workdir runs/paper_small --jobs 2 --analyze

--dry-run prints the command (for a sweep, also every member's command) and runs nothing.
USAGE
}

DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${ICL_JAX_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
CMD=("$PY" -m icl_jax "$@")
cd "$ROOT"

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  if [[ "$1" == sweep ]]; then
    "${CMD[@]}" --dry-run
  fi
  exit 0
fi
exec "${CMD[@]}"
