#!/usr/bin/env bash
# T-CERTIFY the models Cohen et al. (2019) released, at the paper's protocol: CERTIFY, T-CERTIFY
# and strict T-CERTIFY from the same samples on 500 points (CIFAR-10: every 20th test image;
# ImageNet: every 100th validation image), n0 100, N 100,000, alpha 0.001; then the certified
# accuracy tables and plots (the paper's Figure 2, for models no one here trained).
#
# smoothcert never downloads models: fetch models.tar.gz from the locuslab/smoothing README
# yourself and unpack it; MODELS is its models/ folder, which holds
#   cifar10/resnet110/noise_{0.12,0.25,0.50,1.00}/checkpoint.pth.tar
#   imagenet/resnet50/noise_{0.25,0.50,1.00}/checkpoint.pth.tar
# (any other file in Cohen's format, e.g. SmoothAdv's or Consistency's, is certified alike).
#
# Usage: MODELS=~/cohen/models CIFAR=~/data IMAGENET=/data/imagenet GPUS=4 \
#            bash experiments/gpu/certify_cohen_models.sh
#   CIFAR holds cifar-10-batches-py/, IMAGENET holds val/ (ImageFolder); leave one out to skip
#   that dataset. N and MAX_EXAMPLES change the protocol: for a smoke test only.
set -euo pipefail
MODELS=${MODELS:?set MODELS to the models/ folder of Cohen et al. release (see the header)}
CIFAR=${CIFAR:-}
IMAGENET=${IMAGENET:-}
GPUS=${GPUS:-1}
OUT=${OUT:-runs/gpu/cohen_models}
N=${N:-100000}
MAX_EXAMPLES=${MAX_EXAMPLES:-500}
AMP=${AMP:-}   # e.g. AMP="--amp bf16": then the certificates are the bf16 model's
# --N and --max-examples: torchrun would swallow --n and --max (pytorch/pytorch#120601).
RUN="torchrun --nproc_per_node $GPUS -m smoothcert"

certify() {  # dataset, data dir, model folder, skip, batch, sigmas...
  local dataset=$1 data=$2 folder=$3 skip=$4 batch=$5
  shift 5
  for sigma in "$@"; do
    local checkpoint="$MODELS/$folder/noise_$sigma/checkpoint.pth.tar"
    if [ ! -f "$checkpoint" ]; then
      echo "skipped: no $checkpoint" >&2
      continue
    fi
    $RUN certify "$checkpoint" --format cohen --sigma "$sigma" --dataset "$dataset" \
        --data-dir "$data" --skip "$skip" --max-examples "$MAX_EXAMPLES" --n0 100 --N "$N" \
        --alpha 0.001 --batch "$batch" --method both --seed 0 $AMP \
        --out "$OUT/${dataset}_s$sigma.tsv"
  done
  smoothcert analyze "$OUT/${dataset}"_s*.tsv --plot "$OUT/$dataset.png" | tee "$OUT/$dataset.md"
}

mkdir -p "$OUT"
if [ -n "$CIFAR" ]; then
  certify cifar10 "$CIFAR" cifar10/resnet110 20 1000 0.12 0.25 0.50 1.00
fi
if [ -n "$IMAGENET" ]; then
  certify imagenet "$IMAGENET" imagenet/resnet50 100 400 0.25 0.50 1.00
fi
