#!/bin/bash
# grow.sh NAME BUDGET_S: train (or resume) NAME on one GPU within BUDGET_S seconds of this call.
# env: EPOCHS (cosine length), LR, BS, MODEL, INIT
S=$(date +%s)
N=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpux/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/gpux/ckpt /tmp/gpux/cache
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 30 > $OUT/gpu.txt 2>&1 &
SMI=$!
[ -f /tmp/gpux/ckpt/$N.ckpt.pt ] || [ ! -f .gpux/resume/$N.ckpt.pt ] || cp .gpux/resume/$N.ckpt.pt /tmp/gpux/ckpt/
[ -f /tmp/gpux/ckpt/$N.ckpt.pt ] && echo "resuming $N" || echo "starting $N"
MIN=$(python3 -c "print(max(1.0, ($2 - ($(date +%s) - $S) - 40) / 60))")
echo "training budget $MIN min"
python3 -m matcouple.surrogate.train --data .gpux/data/mp2018_fe_gap_trainval.csv.gz \
  --out /tmp/gpux/ckpt/$N.ckpt.pt --epochs ${EPOCHS:-55} --minutes $MIN --batch-size ${BS:-512} \
  --lr ${LR:-1e-3} --model ${MODEL:-dropout=0,scalars=144,vectors=36,tensors=16,layers=6} \
  ${INIT:+--init-from $INIT} --cache-dir /tmp/gpux/cache --workers 14 --device cuda \
  --ema ${EMA:-0} --export $OUT/$N.pt > $OUT/$N.log 2> /tmp/gpux/err.log
echo "train rc=$?"; tail -c 600 /tmp/gpux/err.log | tr '\r' '\n' | tail -4
grep -E "^epoch|budget|exported" $OUT/$N.log | tail -40
python3 - "$N" <<'PY'
import json, sys, torch
n = sys.argv[1]
s = torch.load(f"/tmp/gpux/ckpt/{n}.ckpt.pt", weights_only=True, map_location="cpu")
json.dump({"name": n, "train_config": s["train_config"], "model_config": s["model_config"],
           "epoch": s["epoch"], "history": s["history"]}, open(f"{__import__('os').environ['OUT']}/{n}.json", "w"), indent=1)
PY
split -b 15M -d /tmp/gpux/ckpt/$N.ckpt.pt $OUT/$N.ckpt.part
ls -la $OUT; kill $SMI
echo "call took $(( $(date +%s) - S )) s"
