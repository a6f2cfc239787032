#!/usr/bin/env bash
# ViLT NLVR2 -ft baseline (PuMer's teacher): 10 epochs, global batch 256, the third modality row copied from the image row.
exec "$(dirname "$0")/run.sh" ft nlvr configs/vilt_nlvr.yaml 10 output/nlvr_vilt "$@"
