#!/bin/bash
# s21.sh BUDGET_S ARM...: race.sh with the arms, and beside them the full-size heads-vs-models
# comparison once race.sh has built the graph cache.
bash .gpux/s/race.sh "$@" > $OUT/race.out 2>&1 &
R=$!
for i in $(seq 1 120); do grep -q "^val " $OUT/race.out 2>/dev/null && break; sleep 2; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout $(( $1 - 90 )) python3 benchmarks/heads_vs_models.py --data .gpux/data/mp2018_fe_gap_trainval.csv.gz \
  --device cuda --epochs 6 --batch-size 256 --lr 1.5e-3 --cache-dir /tmp/gpux/cache --workers 8 --quiet \
  --out $OUT/heads > $OUT/heads.log 2>&1
echo "heads rc=$?"
wait $R
cat $OUT/race.out
tail -5 $OUT/heads.log
