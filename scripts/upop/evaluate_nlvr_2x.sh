#!/usr/bin/env bash
# Evaluates UPop nlvr 2x (the released file, or CKPT=path). Published: dev 80.33, test-P 81.13; 150.15 M params, 89.36 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_2x_compressed.pth}" output/upop/nlvr_2x_eval "${infer[@]}" "$@"
