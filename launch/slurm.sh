#!/usr/bin/env bash
# A sweep as a SLURM job array: one array task per member.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh [--dry-run] --config SWEEP[:ARG] --workdir DIR [--members a,b]
                       [--partition P] [--time HH:MM:SS] [--cpus N] [--gpus N]
                       [--account A] [-- ARGS for icl-jax sweep, e.g. --config.train.steps=4000]

Resolves and validates every member here (a bad member fails before anything is
submitted), then submits one sbatch array: task i runs
  python -m icl_jax sweep --config SWEEP --workdir DIR --members <member i>
so each member trains, resumes and is indexed in DIR/sweep.json as in a local sweep.
DIR must be on a filesystem the compute nodes share. Run it again after a partial
failure: finished members are skipped.

  launch/slurm.sh --config paper_small --workdir /shared/runs/paper_small \
    --partition cpu --time 02:00:00 --cpus 4

--dry-run prints the sbatch script and submits nothing.
USAGE
}

DRY_RUN=0; CONFIG=""; WORKDIR=""; MEMBERS=""; PARTITION=""; TIME="04:00:00"; CPUS=2
GPUS=0; ACCOUNT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --members) MEMBERS="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --cpus) CPUS="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$CONFIG" || -z "$WORKDIR" ]]; then usage >&2; exit 2; fi
EXTRA=("$@")

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${ICL_JAX_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
cd "$ROOT"
WORKDIR="$(realpath -m "$WORKDIR")"

# The member names, after validating every member's config (with the extra overrides).
NAMES=$("$PY" - "$CONFIG" "$WORKDIR" "$MEMBERS" "${EXTRA[@]+"${EXTRA[@]}"}" <<'PYTHON'
import sys
from icl_jax import cli, sweep
from icl_jax.config import ConfigError
spec, workdir, members, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
_, overrides = cli.split_overrides(extra)
try:
    chosen = sweep.resolve(spec, workdir, overrides, [m for m in members.split(",") if m] or None)
except ConfigError as e:
    print(f"error: {e.args[0]}", file=sys.stderr)
    sys.exit(2)
print(" ".join(m.name for m in chosen))
PYTHON
)
read -r -a NAME_ARRAY <<< "$NAMES"
N=${#NAME_ARRAY[@]}

SWEEP_CMD=("$PY" -m icl_jax sweep --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=icl-sweep
#SBATCH --array=0-$((N - 1))
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%A_%a.out"
[[ -n "$PARTITION" ]] && SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && SCRIPT+=$'\n'"#SBATCH --account=$ACCOUNT"
[[ "$GPUS" != 0 ]] && SCRIPT+=$'\n'"#SBATCH --gpus-per-task=$GPUS"
SCRIPT+="
set -euo pipefail
MEMBERS=(${NAME_ARRAY[*]})
cd $(printf '%q' "$ROOT")
exec $(printf '%q ' "${SWEEP_CMD[@]}")--members \"\${MEMBERS[\$SLURM_ARRAY_TASK_ID]}\"
"

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%s' "$SCRIPT"
  exit 0
fi
mkdir -p "$WORKDIR"
printf '%s' "$SCRIPT" > "$WORKDIR/sbatch.sh"
sbatch "$WORKDIR/sbatch.sh"
