#!/usr/bin/env bash
# Evaluates UPop nlvr 5x (the released file, or CKPT=path). Published: dev 68.71, test-P 68.76; 76.81 M params, 39.93 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_5x_compressed.pth}" output/upop/nlvr_5x_eval "${infer[@]}" "$@"
