#!/usr/bin/env bash
# Evaluates MADTP retrieval_flickr_clip_p0.5 (CKPT=path; default output/madtp/retrieval_flickr_clip_p0.5/model_compressed.safetensors).
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr_clip.yaml "${CKPT:-output/madtp/retrieval_flickr_clip_p0.5/model_compressed.safetensors}" output/madtp/retrieval_flickr_clip_p0.5_eval --set batch_size_test=32 "$@"
