#!/bin/bash
# usage: cont3.sh NAME BATCH BUDGET_S -- continue the shipped value model: cosine over $EPOCHS at peak $LR,
# resumable in /tmp/gpux/ckpt (or from .gpux/resume/NAME.ckpt.pt after a cold start)
export PYTHONUNBUFFERED=1 GPUX_WORK=/tmp/gpux
N=$1
mkdir -p /tmp/gpux/ckpt /tmp/gpux/logs
S=$(date +%s)
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > $OUT/gpu.txt 2>&1 &
SMI=$!
[ -f /tmp/gpux/cache/done ] || { python3 .gpux/scripts/build_cache.py > $OUT/cache.log 2>&1 && touch /tmp/gpux/cache/done; }
echo "cache ready after $(( $(date +%s) - S )) s"
[ -n "$PRE" ] && eval "$PRE"
[ -f /tmp/gpux/ckpt/$N.ckpt.pt ] || [ ! -f .gpux/resume/$N.ckpt.pt ] || cp .gpux/resume/$N.ckpt.pt /tmp/gpux/ckpt/
B=$(( $3 - ($(date +%s) - S) ))
EPOCHS=${EPOCHS:-50} python3 .gpux/scripts2/recipe.py $N $2 ${LR:-8e-4} $B $OUT matcouple/surrogate/models/value-crysformer-wide.pt 2>&1 | tail -n 60
cp /tmp/gpux/ckpt/$N.ckpt.pt $OUT/
kill $SMI
