#!/usr/bin/env bash
# Evaluates MADTP caption_coco_p0.75 (CKPT=path; default output/madtp/caption_coco_p0.75/model_compressed.safetensors).
exec "$(dirname "$0")/run.sh" evaluate caption configs/caption_coco.yaml "${CKPT:-output/madtp/caption_coco_p0.75/model_compressed.safetensors}" output/madtp/caption_coco_p0.75_eval "$@"
