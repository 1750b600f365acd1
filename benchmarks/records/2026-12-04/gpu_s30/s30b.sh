#!/bin/bash
# s30b.sh: a second, low-lr cosine for the value model Mk16 (value-crysformer-wide-k16.pt) on k=16 graphs as run Mk16b.
# env: EPOCHS (cosine length), BUDGET (seconds for this call), THRU=1 (first measure the
# GPU throughput of the shipped pair, fast mode value2, on the val split, twice).
# The checkpoint returns as $OUT/Mk16b.ckpt.partNN; join into .gpux/resume/Mk16b.ckpt.pt to carry.
S=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpux/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=$PWD/.gpux/data/mp2018_fe_gap_trainval.csv.xz
mkdir -p /tmp/gpux/ckpt /tmp/gpux/cache
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader -l 20 >> $OUT/gpu.txt 2>&1 &
SMI=$!
if [ -n "$THRU" ]; then
  for T in a b; do
    python3 benchmarks/surrogate.py --device cuda --workers 15 --mc-samples 0 --data $D \
      --split-column megnet_split --split val --out $OUT/pred_gpu_pair_$T.json 2>&1 | grep -iE "MAE|throughput|struct"
  done
  echo "throughput done $(( $(date +%s) - S )) s"
fi
python3 - <<PY
import time; t=time.time()
from pathlib import Path
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.graph import GraphSpec
for s in ("train", "val"):
    g = load_graphs(Path("$D"), ("formation_energy_per_atom", "band_gap"), split_column="megnet_split",
                    split=s, spec=GraphSpec(k=16), limit=None, cache_dir=Path("/tmp/gpux/cache"), workers=15, progress=False)
    print(s, len(g.graphs), "graphs", round(time.time()-t), "s", flush=True)
PY
C=/tmp/gpux/ckpt/Mk16b.ckpt.pt
[ ! -f $C ] && [ -f .gpux/resume/Mk16b.ckpt.pt ] && cp .gpux/resume/Mk16b.ckpt.pt $C && echo "resuming from the carried checkpoint"
MIN=$(python3 -c "print(max(1.0, (${BUDGET:-570} - ($(date +%s) - $S) - 40) / 60))")
echo "Mk16b: epochs ${EPOCHS} minutes $MIN"
python3 -m matcouple.surrogate.train --data $D --out $C --epochs $EPOCHS --minutes $MIN \
  --batch-size 512 --lr 1.5e-4 --graph k=16 --warmup-epochs 0.2 --weight-decay 0.2 --target-weights 5,1 \
  --ema 0.998 --seed 9 --init-from matcouple/surrogate/models/value-crysformer-wide-k16.pt \
  --cache-dir /tmp/gpux/cache --workers 4 --device cuda --quiet --export $OUT/Mk16b.pt \
  > $OUT/Mk16b.log 2> /tmp/gpux/Mk16b.err
echo "train rc=$?"; tail -c 600 /tmp/gpux/Mk16b.err | tr '\r' '\n' | tail -4
python3 - <<'PY'
import json, os, torch
s = torch.load("/tmp/gpux/ckpt/Mk16b.ckpt.pt", weights_only=True, map_location="cpu")
json.dump({"name": "Mk16b", "train_config": s["train_config"], "model_config": s["model_config"],
           "epoch": s["epoch"], "history": s["history"]}, open(f"{os.environ['OUT']}/Mk16b.json", "w"), indent=1)
for h in s["history"]:
    print("Mk16b", h["epoch"], round(h["elapsed_s"]), "train %.4f" % h["train_loss"], "Ef %.4f gap %.4f" % (h["val_mae_formation_energy_per_atom"], h["val_mae_band_gap"]),
          "raw Ef %.4f" % h.get("val_raw_mae_formation_energy_per_atom", float("nan")))
PY
split -b 15M -d $C $OUT/Mk16b.ckpt.part
kill $SMI
echo "call took $(( $(date +%s) - S )) s"
