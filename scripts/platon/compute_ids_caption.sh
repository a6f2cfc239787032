#!/usr/bin/env bash
# Intrinsic dimension of the 168 masked modules of the dense BLIP caption model (`pretrained` in
# configs/caption_coco.yaml), as the seed's ComputeID.py -n 2000: writes output/id/caption/ids.json (+ the seed's
# result_id.txt / ID.txt, ID.png). Add --gpu K and --max-memory to fit the activations (about 0.5 TB in the seed).
exec "$(dirname "$0")/run.sh" ids caption configs/caption_coco.yaml output/id/caption "$@"
