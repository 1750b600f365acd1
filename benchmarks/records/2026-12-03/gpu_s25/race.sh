#!/bin/bash
# race.sh BUDGET_S ARM...: train several arms side by side on one GPU from the same start
# (INIT), each within BUDGET_S seconds of this call; resumes arms whose checkpoint exists.
# ARM = NAME:BS:LR:EMA:EXTRA (EXTRA: extra train flags with '+' for spaces).
# env: INIT (model to start from), MODEL, EPOCHS (cosine length; FIT=1: refit to the budget)
# Checkpoints survive a fresh machine or a new session: each arm's checkpoint comes back as
# $OUT/NAME.ckpt.partNN (15 MB pieces; join them with cat into .gpux/resume/NAME.ckpt.pt
# and carry .gpux/resume), and an arm with no checkpoint here resumes from that copy.
S=$(date +%s)
B=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpux/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=.gpux/data/mp2018_fe_gap_trainval.csv.gz
mkdir -p /tmp/gpux/ckpt /tmp/gpux/cache
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 >> $OUT/gpu.txt 2>&1 &
SMI=$!
python3 - <<PY
import time; t=time.time()
from pathlib import Path
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.graph import GraphSpec
for s in ("train", "val"):
    g = load_graphs(Path("$D"), ("formation_energy_per_atom", "band_gap"), split_column="megnet_split",
                    split=s, spec=GraphSpec(), limit=None, cache_dir=Path("/tmp/gpux/cache"), workers=15, progress=False)
    print(s, len(g.graphs), "graphs", round(time.time()-t), "s", flush=True)
PY
PIDS=""
for ARM in "$@"; do
  IFS=: read N BS LR EMA EXTRA <<< "$ARM"
  if [ ! -f /tmp/gpux/ckpt/$N.ckpt.pt ] && [ -f .gpux/resume/$N.ckpt.pt ]; then
    cp .gpux/resume/$N.ckpt.pt /tmp/gpux/ckpt/ && echo "$N: resuming from the carried checkpoint"
  fi
  EP=${EPOCHS:-16}
  if [ -n "$FIT" ] && [ -f /tmp/gpux/ckpt/$N.ckpt.pt ]; then
    EP=$(python3 - $N $B $S <<'PY'
import sys, time, torch
n, b, s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
st = torch.load(f"/tmp/gpux/ckpt/{n}.ckpt.pt", weights_only=True, map_location="cpu")
h = st["history"]; done = st["epoch"]
# elapsed_s restarts at each call: time per epoch from the steps within one call
steps = sorted(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(h, h[1:]) if b["elapsed_s"] > a["elapsed_s"])
per = steps[len(steps) // 2] if steps else h[-1]["elapsed_s"]
left = b - (time.time() - s) - 60
print(max(done + 1, done + int(left // (per * 1.04))))
PY
)
  fi
  echo "$N: bs $BS lr $LR ema $EMA extra '${EXTRA//+/ }' epochs $EP"
  MIN=$(python3 -c "print(max(1.0, ($B - ($(date +%s) - $S) - 45) / 60))")
  python3 -m matcouple.surrogate.train --data $D --out /tmp/gpux/ckpt/$N.ckpt.pt --epochs $EP \
    --minutes $MIN --batch-size $BS --lr $LR --ema $EMA --model $MODEL ${INIT:+--init-from $INIT} \
    --cache-dir /tmp/gpux/cache --workers 4 --device cuda ${EXTRA//+/ } --quiet \
    --export $OUT/$N.pt > $OUT/$N.log 2> /tmp/gpux/$N.err &
  PIDS="$PIDS $!"
done
for P in $PIDS; do wait $P; echo "pid $P rc=$?"; done
for ARM in "$@"; do
  IFS=: read N BS LR EMA EXTRA <<< "$ARM"
  tail -c 400 /tmp/gpux/$N.err | tr '\r' '\n' | tail -2
  python3 - "$N" <<'PY'
import json, os, sys, torch
n = sys.argv[1]
s = torch.load(f"/tmp/gpux/ckpt/{n}.ckpt.pt", weights_only=True, map_location="cpu")
json.dump({"name": n, "train_config": s["train_config"], "model_config": s["model_config"],
           "epoch": s["epoch"], "history": s["history"]}, open(f"{os.environ['OUT']}/{n}.json", "w"), indent=1)
for h in s["history"]:
    print(n, h["epoch"], round(h["elapsed_s"]), "train %.4f" % h["train_loss"], "Ef %.4f gap %.4f" % (h["val_mae_formation_energy_per_atom"], h["val_mae_band_gap"]),
          "raw Ef %.4f" % h.get("val_raw_mae_formation_energy_per_atom", float("nan")))
PY
done
for ARM in "$@"; do
  IFS=: read N REST <<< "$ARM"
  [ -f /tmp/gpux/ckpt/$N.ckpt.pt ] && split -b 15M -d /tmp/gpux/ckpt/$N.ckpt.pt $OUT/$N.ckpt.part
done
kill $SMI
echo "call took $(( $(date +%s) - S )) s"
