#!/usr/bin/env bash
# The paper's ImageNet Table 1 (ResNet-50, 4 GPUs): Basic and ADREREG (k = 1), then CERTIFY +
# T-CERTIFY on every 100th validation image (500 points), alpha 0.001, n 100,000.
# Usage: DATA=/data/imagenet GPUS=4 bash experiments/gpu/imagenet_table1.sh  (train/ and val/)
set -euo pipefail
DATA=${DATA:?set DATA to the ImageNet folder holding train/ and val/}
GPUS=${GPUS:-4}
OUT=${OUT:-runs/gpu/imagenet}
AMP=${AMP:---amp bf16}
RUN="torchrun --nproc_per_node $GPUS -m smoothcert"
for sigma in 0.25 0.5 1.0; do
  $RUN train --preset imagenet-resnet50 --data-dir "$DATA" --objective gaussian --k 1 \
      --sigma $sigma --workers 8 --seed 0 $AMP --out "$OUT/basic_s$sigma" --resume
  for lam in 0.05 0.1; do
    $RUN train --preset imagenet-resnet50 --data-dir "$DATA" --objective adre --lam $lam --k 1 \
        --sigma $sigma --workers 8 --seed 0 $AMP --out "$OUT/adre_s${sigma}_l$lam" --resume
  done
done
for run in "$OUT"/*/; do
  name=$(basename "$run")
  $RUN certify "$run/checkpoint.pt" --data-dir "$DATA" --split val --skip 100 --n0 100 \
      --N 100000 --alpha 0.001 --batch 400 --method both --seed 0 $AMP --out "$OUT/$name.tsv"
done
smoothcert analyze "$OUT"/*.tsv --plot "$OUT/table1.png" | tee "$OUT/table1.md"
