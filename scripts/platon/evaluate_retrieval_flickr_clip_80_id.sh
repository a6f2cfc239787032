#!/usr/bin/env bash
# Evaluates the pruned model of compress_retrieval_flickr_clip_80_id.sh (or CKPT=path): a dense evaluation of its zero-filled weights.
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr_clip.yaml "${CKPT:-output/platon/retrieval_flickr_clip_80_id/checkpoint_best.pth}" output/platon/retrieval_flickr_clip_80_id_eval "$@"
