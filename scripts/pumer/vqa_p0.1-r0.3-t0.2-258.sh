#!/usr/bin/env bash
# PuMer vilt-vqa2-p0.1-r0.3-t0.2-258: 20 epochs from the pre-trained ViLT with the -ft teacher (run vqa_ft.sh first); 8.70 GMACs at 32 text tokens (dense 15.95).
exec "$(dirname "$0")/run.sh" compress vqa configs/vilt_vqa.yaml 0.1 0.3 0.2 258 20 output/pumer/vqa_p0.1-r0.3-t0.2-258 "$@"
