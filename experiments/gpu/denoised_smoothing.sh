#!/usr/bin/env bash
# Denoised smoothing with an off-the-shelf DDPM (Carlini, Tramer et al., ICLR 2023, "(Certified!!)
# Adversarial robustness for free!"): a classifier you give, behind one-shot denoising by a DDPM
# folder you give, certified with CERTIFY, T-CERTIFY and strict T-CERTIFY from the same samples
# at the project's Table-1 protocol (n0 100, N 100,000, alpha 0.001; 500 points: CIFAR-10 every
# 20th test image, ImageNet every 100th validation image), sigma in {0.25, 0.5, 1.0}, the same
# classifier and DDPM at every sigma (the one-shot timestep t* follows sigma); then the tables.
#
# Published (Carlini et al.): ImageNet 71% certified accuracy at l2 radius 0.5.
#
# smoothcert never downloads anything: fetch the DDPM yourself as a local diffusers folder, e.g.
# google/ddpm-cifar10-32 for CIFAR-10 (flat, or a pipeline folder with unet/ and scheduler/;
# needs pip install 'smoothcert[diffusion]'). A DDPM of another resolution than the classifier's
# images is resized to and back (Carlini et al.'s ImageNet setting). The classifier is any file
# smoothcert certifies; CLASSIFIER_OPTIONS passes e.g. "--checkpoint-format cohen" or
# "--model SPEC" for your own architecture.
#
# Usage: CIFAR=~/data CIFAR_CLASSIFIER=cls.pt CIFAR_DDPM=~/ddpm-cifar10-32 \
#        IMAGENET=/data/imagenet IMAGENET_CLASSIFIER=cls.pt IMAGENET_DDPM=~/ddpm-imagenet \
#        GPUS=4 bash experiments/gpu/denoised_smoothing.sh
#   CIFAR holds cifar-10-batches-py/, IMAGENET holds val/ (ImageFolder); leave a dataset's
#   variables out to skip it. N and MAX_EXAMPLES change the protocol: for a smoke test only.
set -euo pipefail
CIFAR=${CIFAR:-}
IMAGENET=${IMAGENET:-}
GPUS=${GPUS:-1}
OUT=${OUT:-runs/gpu/denoised}
N=${N:-100000}
MAX_EXAMPLES=${MAX_EXAMPLES:-500}
AMP=${AMP:-}   # e.g. AMP="--amp bf16": then the certificates are the bf16 models'
CLASSIFIER_OPTIONS=${CLASSIFIER_OPTIONS:-}
# --N and --max-examples: torchrun would swallow --n and --max (pytorch/pytorch#120601).
RUN="torchrun --nproc_per_node $GPUS -m smoothcert"

certify() {  # dataset, data dir, classifier, DDPM folder, skip, batch
  local dataset=$1 data=$2 classifier=$3 ddpm=$4 skip=$5 batch=$6
  for sigma in 0.25 0.50 1.00; do
    $RUN certify "$classifier" --denoiser "diffusers:$ddpm" --sigma "$sigma" \
        --dataset "$dataset" --data-dir "$data" --skip "$skip" --max-examples "$MAX_EXAMPLES" \
        --n0 100 --N "$N" --alpha 0.001 --batch "$batch" --layout both --seed 0 $AMP \
        $CLASSIFIER_OPTIONS --out "$OUT/${dataset}_s$sigma.tsv"
  done
  smoothcert analyze "$OUT/${dataset}"_s*.tsv --plot "$OUT/$dataset.png" | tee "$OUT/$dataset.md"
}

mkdir -p "$OUT"
if [ -n "$CIFAR" ]; then
  certify cifar10 "$CIFAR" "${CIFAR_CLASSIFIER:?set CIFAR_CLASSIFIER}" \
      "${CIFAR_DDPM:?set CIFAR_DDPM to a diffusers folder}" 20 1000
fi
if [ -n "$IMAGENET" ]; then
  certify imagenet "$IMAGENET" "${IMAGENET_CLASSIFIER:?set IMAGENET_CLASSIFIER}" \
      "${IMAGENET_DDPM:?set IMAGENET_DDPM to a diffusers folder}" 100 100
fi
