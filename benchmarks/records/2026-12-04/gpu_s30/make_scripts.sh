#!/bin/bash
# Writes the stop-30 GPU scripts s30.sh (run Sk16) and s30b.sh (run Mk16b) into .gpux/ from
# stop 29's s29.sh: only the run name, starting model, seed, learning rate and comment differ.
set -e
mkdir -p .gpux
R=benchmarks/records/2026-12-04
sed -e 's/Mk16/Sk16/g' -e 's/value-crysformer-wide.pt/value-crysformer-wide-scratch.pt/' \
    -e 's/--seed 5/--seed 7/' \
    -e '2s/.*/# s30.sh: fine-tune the value model S1b (value-crysformer-wide-scratch.pt) on k=16 graphs as run Sk16 on one GPU, resumably./' \
    $R/gpu_s29/s29.sh > .gpux/s30.sh
sed -e 's/Sk16/Mk16b/g' -e 's/value-crysformer-wide-scratch.pt/value-crysformer-wide-k16.pt/' \
    -e 's/--seed 7/--seed 9/' -e 's/--lr 4e-4/--lr 1.5e-4/' \
    -e '2s/.*/# s30b.sh: a second, low-lr cosine for the value model Mk16 (value-crysformer-wide-k16.pt) on k=16 graphs as run Mk16b./' \
    .gpux/s30.sh > .gpux/s30b.sh
