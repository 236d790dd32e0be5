#!/usr/bin/env bash
# The paper's CIFAR-10 Table 1 (ResNet-110): Basic and ADREREG (single-draw l_per, k = 8),
# then CERTIFY + T-CERTIFY on every 20th test image (500 points), alpha 0.001, n 100,000.
# Usage: DATA=~/data bash experiments/gpu/cifar10_table1.sh   (DATA holds cifar-10-batches-py/)
set -euo pipefail
DATA=${DATA:?set DATA to the folder holding cifar-10-batches-py/}
OUT=${OUT:-runs/gpu/cifar10}
AMP=${AMP:-}   # e.g. AMP="--amp bf16"
for sigma in 0.12 0.25 0.5 1.0; do
  smoothcert train --preset cifar10-resnet110 --data-dir "$DATA" --objective gaussian --k 1 \
      --sigma $sigma --seed 0 $AMP --out "$OUT/basic_s$sigma" --resume
  for lam in 0.1 0.2 0.3; do
    smoothcert train --preset cifar10-resnet110 --data-dir "$DATA" --objective adre --lam $lam \
        --k 8 --single-draw --sigma $sigma --seed 0 $AMP --out "$OUT/adre_s${sigma}_l$lam" --resume
  done
done
for run in "$OUT"/*/; do
  name=$(basename "$run")
  smoothcert certify "$run/checkpoint.pt" --data-dir "$DATA" --skip 20 --n0 100 --n 100000 \
      --alpha 0.001 --batch 1000 --method both --seed 0 --out "$OUT/$name.tsv"
done
smoothcert analyze "$OUT"/basic_*.tsv "$OUT"/adre_*.tsv --plot "$OUT/table1.png" | tee "$OUT/table1.md"
# Figure 1: SmoothAdv vs ADREADV, 2-step PGD, k = 8 (eps 0.5 shown; Salman et al. swept 0.25-2).
for method in smoothadv adreadv; do
  smoothcert train --preset cifar10-resnet110 --data-dir "$DATA" --objective $method --lam 0.2 \
      --k 8 --eps 0.5 --steps 2 --eps-warmup 10 --sigma 0.5 --seed 0 $AMP \
      --out "$OUT/fig1_${method}_s0.5" --resume
  smoothcert certify "$OUT/fig1_${method}_s0.5/checkpoint.pt" --data-dir "$DATA" --skip 20 \
      --n0 100 --n 100000 --alpha 0.001 --batch 1000 --out "$OUT/fig1_${method}_s0.5.tsv"
done
smoothcert analyze "$OUT"/fig1_*.tsv --plot "$OUT/fig1.png" | tee "$OUT/fig1.md"
