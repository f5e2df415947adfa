#!/bin/bash
# The text profile's members on one lent accelerator, in the order that uses a short loan
# best (docs/text.md, "The text profile": the first H200 session ran this by hand).
#
#   MEMBERS=1l,2l,2l-smear STEPS=10000 TRAIN_S=1200 W=/root/w OUT=/some/dir bash launch/text_gpu.sh
#
# 1. The corpus: every .py file under this interpreter's standard library and site-packages,
#    named as data.roots (so every process builds the same corpus, whatever its sys.path),
#    tokenized once into the shared cache.
# 2. The members at once, one process each (icl-jax sweep --jobs), each with a share of the
#    device's memory; a lone small model leaves most of a GPU idle.
# 3. When they finish or after TRAIN_S seconds, whichever is first, they are stopped
#    (SIGTERM: each saves a snapshot first) and analysed together (one shared PCA).
# 4. Everything but the snapshots goes into $OUT/runs.tgz, to bring back. Members trained on
#    separate loans are put together there: `icl-jax claims --scores A/analysis B/analysis`
#    (one PCA over all of them, the claims, results.md).
# TRAIN_ARGS adds config overrides to every member (e.g. to shrink it for a test).
set -u
MEMBERS=${MEMBERS:-1l,2l,2l-smear}; STEPS=${STEPS:-20000}; TRAIN_S=${TRAIN_S:-1200}
W=${W:-runs/text_gpu}; OUT=${OUT:-${W%/}_out}; TRAIN_ARGS=${TRAIN_ARGS:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
ROOTS=${ROOTS:-$($PY -c "import os, site, sysconfig; print(','.join(p for p in [sysconfig.get_paths()['stdlib']] + site.getsitepackages() if os.path.isdir(p)))")}
echo "corpus roots: $ROOTS"
n=$(echo "$MEMBERS" | tr ',' '\n' | grep -c .)
# the corpus once, before the members race to build it
$PY - "$ROOTS" $TRAIN_ARGS <<'PY'
import sys, time
from icl_jax import data
from icl_jax.bench import load_config
t = time.time()
overrides = dict(a[len("--config."):].split("=", 1) for a in sys.argv[2:])
c = load_config("text_hoogland:layers=1", {**overrides, "data.roots": sys.argv[1]})
s = data.make_source(c)
print(f"corpus: {len(s.train):,} training tokens, {len(s.eval):,} held out, {time.time() - t:.0f} s")
PY
$PY -m icl_jax sweep --config text --workdir "$W" --members "$MEMBERS" \
  --jobs "$n" "--config.data.roots=$ROOTS" "--config.train.steps=$STEPS" $TRAIN_ARGS \
  > "$W/sweep.log" 2>&1 &
SWEEP=$!
while kill -0 $SWEEP 2>/dev/null && [ "$(elapsed)" -lt "$TRAIN_S" ]; do
  sleep 30
  echo "--- $(elapsed) s"
  for m in ${MEMBERS//,/ }; do
    [ -f "$W/$m/train.log" ] && echo "$m: $(tail -c 300 "$W/$m/train.log" | tr '\r' '\n' | tail -n 1)"
  done
done
if kill -0 $SWEEP 2>/dev/null; then
  echo "stopping the members at $(elapsed) s"
  # only this script's members: a bare "icl_jax train" pattern would stop every run here
  pkill -TERM -f -- "icl_jax train .*--workdir $W/" ; sleep 20; kill -TERM $SWEEP 2>/dev/null
fi
wait $SWEEP 2>/dev/null
dirs=""; for m in ${MEMBERS//,/ }; do [ -d "$W/$m/snapshots" ] && dirs="$dirs $W/$m"; done
$PY -m icl_jax analyze --workdir $dirs --out "$W/analysis" 2>&1 | tail -n 20
tar czf "$OUT/runs.tgz" --exclude=snapshots --exclude=.jax_cache -C "$W" .
echo "done at $(elapsed) s: $OUT/runs.tgz"
