#!/usr/bin/env bash
# The field's baselines on CIFAR-10 (ResNet-110), each with its paper's recipe, beside the
# paper's Table 1 (cifar10_table1.sh trains Basic and ADREREG): MACER, Consistency,
# Consistency + ADRE's regulariser, SmoothMix, at sigma 0.25 / 0.5 / 1.0; then CERTIFY and
# T-CERTIFY on every 20th test image (500 points), alpha 0.001, n0 100, n 100,000.
# Usage: DATA=~/data GPUS=4 bash experiments/gpu/cifar10_baselines.sh
#        (DATA holds cifar-10-batches-py/; GPUS processes per run, one GPU each)
# Under torchrun the sample count is spelled --N and the example limit --max-examples
# (torchrun's parser swallows --n and --max); --batch is the GLOBAL batch, split over GPUS.
set -euo pipefail
DATA=${DATA:?set DATA to the folder holding cifar-10-batches-py/}
OUT=${OUT:-runs/gpu/cifar10_baselines}
GPUS=${GPUS:-1}
AMP=${AMP:-}   # e.g. AMP="--amp bf16"
ADRE_LAM=${ADRE_LAM:-0.1}   # ADRE's lambda on top of Consistency
smoothcert() { torchrun --standalone --nproc_per_node "$GPUS" -m smoothcert "$@"; }

for sigma in 0.25 0.5 1.0; do
  case $sigma in  # the papers' sigma-dependent values (presets hold the rest)
    0.25) macer_lam=12; consistency_lam=20; smoothmix_step=0.5 ;;
    0.5)  macer_lam=12; consistency_lam=10; smoothmix_step=1.0 ;;
    1.0)  macer_lam=4;  consistency_lam=10; smoothmix_step=2.0 ;;
  esac
  common=(--data-dir "$DATA" --sigma "$sigma" --seed 0 $AMP --resume)
  smoothcert train --preset cifar10-resnet110-macer --macer-lam $macer_lam "${common[@]}" \
      --out "$OUT/macer_s$sigma"
  smoothcert train --preset cifar10-resnet110-consistency --consistency-lam $consistency_lam \
      "${common[@]}" --out "$OUT/consistency_s$sigma"
  smoothcert train --preset cifar10-resnet110-consistency --consistency-lam $consistency_lam \
      --lam "$ADRE_LAM" "${common[@]}" --out "$OUT/consistency_adre_s${sigma}_l$ADRE_LAM"
  smoothcert train --preset cifar10-resnet110-smoothmix --smoothmix-step $smoothmix_step \
      "${common[@]}" --out "$OUT/smoothmix_s$sigma"
done
for run in "$OUT"/*/; do
  name=$(basename "$run")
  smoothcert certify "$run/checkpoint.pt" --data-dir "$DATA" --skip 20 --max-examples 500 \
      --n0 100 --N 100000 --alpha 0.001 --batch 1000 --method both --seed 0 \
      --out "$OUT/$name.tsv"
done
# One table with Basic and ADREREG of cifar10_table1.sh where those ran (runs/gpu/cifar10).
shopt -s nullglob
table1=(runs/gpu/cifar10/basic_s*.tsv runs/gpu/cifar10/adre_s*_l*.tsv)
shopt -u nullglob
command smoothcert analyze "${table1[@]}" "$OUT"/*.tsv --plot "$OUT/baselines.png" \
    | tee "$OUT/baselines.md"
