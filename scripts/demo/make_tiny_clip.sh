#!/usr/bin/env bash
# Rebuilds the tiny CLIP checkpoints the CLIP demos start from, the way CLIP itself is made: contrastive
# pre-training from scratch (OpenAI's initialisation) on the image-caption pairs of a separate, larger pre-training
# world (n = 3000, seed 1: 15,000 captions), never the demo world's held-out splits. Pre-training uses the plain
# contrastive loss against the queue (alpha 0): momentum distillation from a model that knows nothing holds the
# loss at chance. The dense retrieval demo is then fine-tuned from it (configs/demo/retrieval_clip.yaml) and is
# the pruners' starting point (`pruner_pretrained`), with its intrinsic dimensions for `--pruner platon --useID`.
# About 20 minutes on 2 quiet CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
CONFIG=configs/demo/retrieval_clip.yaml
WORLD=(--set world.dir=.synthetic/pretrain_world --set world.n=3000 --set world.seed=1)
DROP=(--drop visual_m --drop text_m --drop image_queue --drop text_queue --drop idx_queue --drop ptr_queue)

$PY compress_retrieval.py --demo --config $CONFIG --output_dir output/demo/clip_pretrain --overwrite "${WORLD[@]}" \
    --set pretrained= --epoch 12 --set init_lr=5e-4 --set warmup_steps=100 --set weight_decay=0.05 --set alpha=0 \
    --set batch_size_train=64 --set eval_every=6 --set measure_latency=false
$PY scripts/export_weights.py output/demo/clip_pretrain/checkpoint_last.pth checkpoints/demo/clip_tiny_pretrain.pth \
    --half "${DROP[@]}"
$PY compress_retrieval.py --demo --config $CONFIG --output_dir output/demo/retrieval_clip --overwrite
$PY scripts/export_weights.py output/demo/retrieval_clip/checkpoint_best.pth checkpoints/demo/clip_tiny_retrieval.pth \
    --half "${DROP[@]}"
$PY compute_id.py --demo --config $CONFIG --cpu --estimator textbook -n 1000 \
    --pretrained checkpoints/demo/clip_tiny_retrieval.pth --output output/demo/id/retrieval_clip
cp output/demo/id/retrieval_clip/ids.json checkpoints/demo/clip_tiny_retrieval_ids.json
