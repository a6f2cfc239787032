#!/usr/bin/env bash
# Evaluates the pruned model of compress_caption_80_id.sh (or CKPT=path): a dense evaluation of its zero-filled weights.
exec "$(dirname "$0")/run.sh" evaluate caption configs/caption_coco.yaml "${CKPT:-output/platon/caption_80_id/checkpoint_best.pth}" output/platon/caption_80_id_eval "$@"
