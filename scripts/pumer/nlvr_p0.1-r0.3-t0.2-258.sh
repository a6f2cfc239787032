#!/usr/bin/env bash
# PuMer vilt-nlvr2-p0.1r0.3t0.2-258: 20 epochs with the -ft teacher; 17.4 GMACs for the two passes (dense 31.9).
exec "$(dirname "$0")/run.sh" compress nlvr configs/vilt_nlvr.yaml 0.1 0.3 0.2 258 20 output/pumer/nlvr_p0.1-r0.3-t0.2-258 "$@"
