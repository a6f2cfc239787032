#!/usr/bin/env bash
# Evaluates MADTP retrieval_flickr_p0.75 (CKPT=path; default output/madtp/retrieval_flickr_p0.75/model_compressed.safetensors).
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr.yaml "${CKPT:-output/madtp/retrieval_flickr_p0.75/model_compressed.safetensors}" output/madtp/retrieval_flickr_p0.75_eval --set batch_size_test=32 "$@"
