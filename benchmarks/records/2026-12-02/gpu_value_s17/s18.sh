#!/bin/bash
# s18.sh BUDGET_S: GPU prediction speed of the shipped models (fused vs e3nn), then continue the value model as V4
S=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpux/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=.gpux/data/mp2018_fe_gap_trainval.csv.gz
for r in a b; do for f in 1 0; do
  MATCOUPLE_FUSED_TP=$f timeout 70 python3 benchmarks/surrogate.py --data $D --device cuda --workers 15 --mc-samples 0 \
    --out $OUT/pred_gpu_fused${f}_$r.json > $OUT/pred_gpu_fused${f}_$r.txt 2>&1
  echo "fused=$f run $r: $(grep -E 'throughput|MAE' $OUT/pred_gpu_fused${f}_$r.txt | tr "\n" " ")"
done; done
echo "bench done after $(( $(date +%s) - S )) s"
EPOCHS=${EPOCHS:-24} LR=${LR:-5e-4} FUSED=1 bash .gpux/scripts3/cont3.sh V4 512 $(( $1 - ($(date +%s) - S) ))
