#!/usr/bin/env bash
# PLATON + ID caption 80 %: as compress_caption_80.sh with every score multiplied by its module's intrinsic
# dimension (the seed's --useID). IDS defaults to output/id/caption/ids.json; when it is missing it is measured
# first on the dense caption model of configs/caption_coco.yaml (compute_ids_caption.sh: compute_id.py -n 2000).
set -euo pipefail
cd "$(dirname "$0")/../.."
ids=${IDS:-output/id/caption/ids.json}
[ -f "$ids" ] || scripts/platon/compute_ids_caption.sh
exec scripts/platon/run.sh compress caption configs/caption_coco.yaml 0.2 output/platon/caption_80_id --useID "$ids" "$@"
