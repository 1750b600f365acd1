#!/bin/bash
# Writes the stop-31 GPU script s31.sh (run Mk24) into .gpux/ from stop 30's s30b.sh (itself
# written by gpu_s30/make_scripts.sh): only the run name, neighbours, seed, learning rate and
# comment differ. Run gpu_s30/make_scripts.sh first.
set -e
sed -e 's/Mk16b/Mk24/g' -e 's/k=16/k=24/g' -e 's/--seed 9/--seed 11/' -e 's/--lr 1.5e-4/--lr 4e-4/' \
    -e '2s/.*/# s31.sh: fine-tune Mk16 (value-crysformer-wide-k16.pt) on k=24 graphs as run Mk24 on one GPU, resumably (next session)./' \
    .gpux/s30b.sh > .gpux/s31.sh
