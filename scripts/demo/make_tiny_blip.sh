#!/usr/bin/env bash
# Rebuilds checkpoints/demo/blip_tiny_pretrain.pth, the tiny pre-trained BLIP every vision-language demo
# fine-tunes from, the way BLIP itself is made: an image classifier initialises the ViT, then ITC + ITM + LM
# pre-training on image-caption pairs (here the synthetic world's COCO-format captions). About 10 minutes
# on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}

$PY compress_classification.py --demo --output_dir output/demo/vit_init
$PY pretrain.py --demo --output_dir output/demo/pretrain --overwrite \
    --set vit_init=output/demo/vit_init/checkpoint_best.pth
$PY scripts/export_weights.py output/demo/pretrain/checkpoint_best.pth checkpoints/demo/blip_tiny_pretrain.pth --half
