#!/usr/bin/env bash
# Evaluates UPop nlvr 3x (the released file, or CKPT=path). Published: dev 76.89, test-P 77.61; 109.01 M params, 65.29 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_3x_compressed.pth}" output/upop/nlvr_3x_eval "${infer[@]}" "$@"
