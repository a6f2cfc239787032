#!/usr/bin/env bash
# PLATON + ID NLVR2 80 %: as compress_nlvr_80.sh with ID-weighted scores. The seed ships no NLVR2 ID table (its list
# is empty and --useID crashes); IDS defaults to output/id/nlvr/ids.json, measured first on the dense NLVR model
# of configs/nlvr.yaml when missing (compute_ids_nlvr.sh: compute_id.py -n 2000, all 222 modules).
set -euo pipefail
cd "$(dirname "$0")/../.."
ids=${IDS:-output/id/nlvr/ids.json}
[ -f "$ids" ] || scripts/platon/compute_ids_nlvr.sh
exec scripts/platon/run.sh compress nlvr configs/nlvr.yaml 0.2 output/platon/nlvr_80_id --useID "$ids" "$@"
