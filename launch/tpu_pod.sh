#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod slice.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project PROJECT]
                         [--repo DIR] train|sweep ARGS...

Runs `python3 -m icl_jax ARGS...` on every worker of the TPU VM NAME at once
(gcloud compute tpus tpu-vm ssh --worker=all), with ICL_JAX_DISTRIBUTED=1 so that
jax finds the other workers itself. DIR is where the repository is installed on
the workers (default: icl_jax, relative to the home directory there).

--workdir must be storage every worker sees: a gs:// path, or a bucket or Filestore
mounted at the same path on every worker (see docs/clusters.md).

  launch/tpu_pod.sh --tpu my-v4-32 --zone us-central2-b -- \
    train --config paper --workdir gs://my-bucket/runs/paper

--dry-run prints the gcloud command and runs nothing.
USAGE
}

DRY_RUN=0; TPU=""; ZONE=""; PROJECT=""; REPO="icl_jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ -z "$TPU" || -z "$ZONE" || $# -lt 1 ]]; then
  usage >&2; exit 2
fi

REMOTE="cd $(printf '%q' "$REPO") && ICL_JAX_DISTRIBUTED=1 python3 -m icl_jax"
for arg in "$@"; do REMOTE+=" $(printf '%q' "$arg")"; done
CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE")
[[ -n "$PROJECT" ]] && CMD+=(--project "$PROJECT")
CMD+=(--worker=all --command "$REMOTE")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
