#!/usr/bin/env bash
# Intrinsic dimension of the 222 masked modules of the dense BLIP NLVR model (`pretrained` in configs/nlvr.yaml),
# with the seed's ComputeID settings (-n 2000): writes output/id/nlvr/ids.json. The seed has no NLVR2 table.
exec "$(dirname "$0")/run.sh" ids nlvr configs/nlvr.yaml output/id/nlvr "$@"
