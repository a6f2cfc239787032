#!/usr/bin/env bash
# PLATON + ID CLIP Flickr30k retrieval 80 %: as compress_retrieval_flickr_clip_80.sh with every score multiplied by its
# module's intrinsic dimension (the seed's --useID). IDS defaults to output/id/retrieval_flickr_clip/ids.json; when it
# is missing it is measured first on the dense model of configs/retrieval_flickr_clip.yaml
# (compute_ids_retrieval_flickr_clip.sh: compute_id.py -n 2000).
set -euo pipefail
cd "$(dirname "$0")/../.."
ids=${IDS:-output/id/retrieval_flickr_clip/ids.json}
[ -f "$ids" ] || scripts/platon/compute_ids_retrieval_flickr_clip.sh
exec scripts/platon/run.sh compress retrieval configs/retrieval_flickr_clip.yaml 0.2 output/platon/retrieval_flickr_clip_80_id --useID "$ids" "$@"
