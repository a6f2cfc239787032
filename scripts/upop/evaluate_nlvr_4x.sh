#!/usr/bin/env bash
# Evaluates UPop nlvr 4x (the released file, or CKPT=path). Published: dev 72.85, test-P 73.55; 88.61 M params, 50.35 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_4x_compressed.pth}" output/upop/nlvr_4x_eval "${infer[@]}" "$@"
