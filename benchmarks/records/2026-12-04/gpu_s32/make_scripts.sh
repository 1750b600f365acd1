#!/bin/bash
# Writes the stop-32 GPU scripts into .gpux/ from stop 31's s31.sh (written by
# ../gpu_s31/make_script.sh): s32.sh (run Sk24: S1b on 24 neighbours, peak lr 1e-4, seed 13)
# and s33.sh (run Mk20: M on 20 neighbours, peak lr 4e-4, seed 17); only the run name, start
# model, neighbours, seed, learning rate and comment differ.
set -e
sed -e 's/Mk24/Sk24/g' -e 's/--seed 11/--seed 13/' -e 's/--lr 4e-4/--lr 1e-4/' \
    -e 's#value-crysformer-wide-k16.pt#value-crysformer-wide-scratch.pt#' \
    -e '2s/.*/# s32.sh: fine-tune S1b (value-crysformer-wide-scratch.pt) on k=24 graphs at a low peak lr as run Sk24 on one GPU, resumably (next session)./' \
    .gpux/s31.sh > .gpux/s32.sh
sed -e 's/Sk24/Mk20/g' -e 's/k=24/k=20/g' -e 's/--lr 1e-4/--lr 4e-4/' -e 's/--seed 13/--seed 17/' \
    -e 's#value-crysformer-wide-scratch.pt#value-crysformer-wide.pt#' \
    -e '2s/.*/# s33.sh: fine-tune M (value-crysformer-wide.pt) on k=20 graphs as run Mk20 on one GPU, resumably./' \
    .gpux/s32.sh > .gpux/s33.sh
