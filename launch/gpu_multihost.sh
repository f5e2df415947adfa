#!/usr/bin/env bash
# One process of a multi-host GPU run: run it once per host (srun does that for you).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_multihost.sh [--dry-run] [--port PORT] train ARGS...

Starts this host's process of a data-parallel run over several GPU hosts. Every host
runs the same command; they meet at a coordinator (process 0's host).

Coordinator, process count and id come from the environment:
  ICL_JAX_COORDINATOR   host:port of process 0 (default under SLURM: the first node
                        of $SLURM_JOB_NODELIST, port --port, default 12355)
  ICL_JAX_NUM_PROCESSES the number of processes (default: $SLURM_NTASKS)
  ICL_JAX_PROCESS_ID    this process's id (default: $SLURM_PROCID)
  ICL_JAX_INIT_TIMEOUT  seconds to wait for the others (default 300)

Under SLURM, one task per node with all its GPUs:
  srun --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 \
    launch/gpu_multihost.sh train --config paper --workdir /shared/runs/paper
By hand, on each of two hosts (ids 0 and 1):
  ICL_JAX_COORDINATOR=host0:12355 ICL_JAX_NUM_PROCESSES=2 ICL_JAX_PROCESS_ID=0 \
    launch/gpu_multihost.sh train --config paper --workdir /shared/runs/paper

--workdir must be on storage every host sees (NFS, Lustre, a mounted bucket).
--dry-run prints the environment and command and runs nothing.
USAGE
}

DRY_RUN=0
PORT=12355
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --port) PORT="$2"; shift 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }

COORDINATOR="${ICL_JAX_COORDINATOR:-}"
if [[ -z "$COORDINATOR" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  COORDINATOR="$HEAD:$PORT"
fi
NUM="${ICL_JAX_NUM_PROCESSES:-${SLURM_NTASKS:-}}"
ID="${ICL_JAX_PROCESS_ID:-${SLURM_PROCID:-}}"
if [[ -z "$COORDINATOR" || -z "$NUM" || -z "$ID" ]]; then
  echo "error: set ICL_JAX_COORDINATOR (host:port), ICL_JAX_NUM_PROCESSES and ICL_JAX_PROCESS_ID, or run under srun" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${ICL_JAX_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
ENV=(ICL_JAX_COORDINATOR="$COORDINATOR" ICL_JAX_NUM_PROCESSES="$NUM" ICL_JAX_PROCESS_ID="$ID")
CMD=("$PY" -m icl_jax "$@")
cd "$ROOT"

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' env "${ENV[@]}" "${CMD[@]}"; echo
  exit 0
fi
exec env "${ENV[@]}" "${CMD[@]}"
