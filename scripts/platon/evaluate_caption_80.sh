#!/usr/bin/env bash
# Evaluates the pruned model of compress_caption_80.sh (or CKPT=path): a dense evaluation of its zero-filled weights.
exec "$(dirname "$0")/run.sh" evaluate caption configs/caption_coco.yaml "${CKPT:-output/platon/caption_80/checkpoint_best.pth}" output/platon/caption_80_eval "$@"
