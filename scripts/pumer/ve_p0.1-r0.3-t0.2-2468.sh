#!/usr/bin/env bash
# PuMer vilt-ve-p0.1r0.3t0.2-2468 (the release's layers; PuMer's command says 2,5,8): 20 epochs with the -ft teacher; 7.64 GMACs at 32 text tokens.
exec "$(dirname "$0")/run.sh" compress ve configs/vilt_ve.yaml 0.1 0.3 0.2 2468 20 output/pumer/ve_p0.1-r0.3-t0.2-2468 "$@"
