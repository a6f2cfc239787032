#!/usr/bin/env bash
# Intrinsic dimension of the 108 masked modules (72 vision, then 36 text) of the dense CLIP Flickr30k model
# (`pretrained` in configs/retrieval_flickr_clip.yaml), measured like the seed's caption table: writes
# output/id/retrieval_flickr_clip/ids.json (+ result_id.txt / ID.txt, ID.png). Both towers embed their half of each
# training pair. Add --gpu K and --max-memory to fit the activations.
exec "$(dirname "$0")/run.sh" ids retrieval configs/retrieval_flickr_clip.yaml output/id/retrieval_flickr_clip "$@"
