#!/bin/bash
# s17.sh BUDGET_S: time the fused training step against e3nn on this GPU, then continue V3 with the faster one
S=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpux/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -z "$FUSED" ]; then
  timeout 150 python3 benchmarks/train_step_fused.py --device cuda --batch 512 --threads 16 --rounds 3 \
    --data .gpux/data/mp2018_fe_gap_trainval.csv.gz --out $OUT/train_step_fused_cuda.json > $OUT/bench.txt 2>&1
  tail -8 $OUT/bench.txt
  FUSED=$(python3 -c "import json;print(1 if json.load(open('$OUT/train_step_fused_cuda.json'))['speedup_fwd_bwd']>1.05 else 0)" 2>/dev/null || echo 0)
fi
echo "FUSED=$FUSED after $(( $(date +%s) - S )) s"
EPOCHS=50 LR=1e-3 FUSED=$FUSED bash .gpux/scripts3/cont3.sh V3 512 $(( $1 - ($(date +%s) - S) ))
