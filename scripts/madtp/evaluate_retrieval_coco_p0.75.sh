#!/usr/bin/env bash
# Evaluates MADTP retrieval_coco_p0.75 (CKPT=path; default output/madtp/retrieval_coco_p0.75/model_compressed.safetensors).
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_coco.yaml "${CKPT:-output/madtp/retrieval_coco_p0.75/model_compressed.safetensors}" output/madtp/retrieval_coco_p0.75_eval --set batch_size_test=32 "$@"
