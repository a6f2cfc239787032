#!/usr/bin/env bash
# Rebuilds the tiny checkpoints the vision-language demos start from, the way BLIP itself is made: an image
# classifier initialises the ViT, then ITC + ITM + LM pre-training on image-caption pairs. Both stages use a
# separate, larger pre-training world (n = 3000, seed 1: 3,000 classification images, 15,000 captions), never
# the demo world's held-out splits. The NLVR2 model then gets ALBEF's text-assignment pre-training on the same
# captions (which of two images a caption describes), and the dense NLVR2 demo is fine-tuned from that, for the
# pruners' demos (`pruner_pretrained` of configs/demo/nlvr.yaml). About 35 minutes on 2 quiet CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
WORLD=(--set world.dir=.synthetic/pretrain_world --set world.n=3000 --set world.seed=1)

$PY compress_classification.py --demo --output_dir output/demo/vit_init --overwrite --epoch 20 "${WORLD[@]}"
$PY pretrain.py --demo --output_dir output/demo/pretrain --overwrite --epoch 6 --set eval_every=6 "${WORLD[@]}" \
    --set vit_init=output/demo/vit_init/checkpoint_best.pth
$PY scripts/export_weights.py output/demo/pretrain/checkpoint_last.pth checkpoints/demo/blip_tiny_pretrain.pth --half
$PY pretrain_nlvr.py --demo --output_dir output/demo/text_assignment --overwrite "${WORLD[@]}"
$PY scripts/export_weights.py output/demo/text_assignment/checkpoint_last.pth checkpoints/demo/blip_tiny_twin.pth \
    --half --drop cls_head
$PY compress_nlvr.py --demo --output_dir output/demo/nlvr --overwrite
$PY scripts/export_weights.py output/demo/nlvr/checkpoint_best.pth checkpoints/demo/blip_tiny_nlvr.pth --half
# The intrinsic dimensions of the dense NLVR2 model, for `--pruner platon --useID` on the demo.
$PY compute_id.py --demo --task nlvr --cpu --estimator textbook -n 1000 --pretrained checkpoints/demo/blip_tiny_nlvr.pth \
    --output output/demo/id/nlvr
cp output/demo/id/nlvr/ids.json checkpoints/demo/blip_tiny_nlvr_ids.json
# The dense demo classifier: the starting point and the teacher of the ToMe demo (configs/demo/classification_tome.yaml).
$PY compress_classification.py --demo --output_dir output/demo/classification --overwrite
$PY scripts/export_weights.py output/demo/classification/checkpoint_best.pth checkpoints/demo/vit_tiny_classifier.pth --half
