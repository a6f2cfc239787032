#!/usr/bin/env bash
# Evaluates the pruned model of compress_nlvr_80.sh (or CKPT=path): a dense evaluation of its zero-filled weights.
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-output/platon/nlvr_80/checkpoint_best.pth}" output/platon/nlvr_80_eval "$@"
