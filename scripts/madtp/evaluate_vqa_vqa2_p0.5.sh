#!/usr/bin/env bash
# Evaluates MADTP vqa_vqa2_p0.5 (CKPT=path; default output/madtp/vqa_vqa2_p0.5/model_compressed.safetensors).
exec "$(dirname "$0")/run.sh" evaluate vqa configs/vqa.yaml "${CKPT:-output/madtp/vqa_vqa2_p0.5/model_compressed.safetensors}" output/madtp/vqa_vqa2_p0.5_eval --set batch_size_test=16 "$@"
