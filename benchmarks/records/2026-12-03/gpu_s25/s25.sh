#!/bin/bash
# s25.sh: GPU check of the block-level fused edge path: end-to-end prediction throughput
# and training step time, the code of this tree ("new") against the three files before
# the change ("old", .gpux/old/), alternating.
S=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpux/whl/*.whl || exit 3
rm -rf /tmp/oldtree && mkdir /tmp/oldtree && cp -r matcouple benchmarks /tmp/oldtree/ && cp .gpux/old/*.py /tmp/oldtree/matcouple/surrogate/
D=$PWD/.gpux/data/mp2018_fe_gap_trainval.csv.gz
export PYTHONUNBUFFERED=1
pred() {  # TREE TAG
  (cd $1 && PYTHONPATH=/tmp/site:$1 python3 benchmarks/surrogate.py --device cuda --workers 15 --mc-samples 0 --data $D --out $OUT/pred_gpu_$2.json 2>&1 | grep -E "MAE|throughput")
}
step() {  # TREE TAG
  (cd $1 && PYTHONPATH=/tmp/site:$1 timeout 150 python3 benchmarks/train_step_fused.py --device cuda --batch 512 --threads 16 --rounds 3 --data $D --out $OUT/step_gpu_$2.json 2>&1 | tail -6)
}
N=$PWD
pred $N new_a; pred /tmp/oldtree old_a; pred $N new_b; pred /tmp/oldtree old_b
echo "pred done $(( $(date +%s) - S )) s"
step $N new; echo "step new done $(( $(date +%s) - S )) s"
step /tmp/oldtree old
echo "call took $(( $(date +%s) - S )) s"
