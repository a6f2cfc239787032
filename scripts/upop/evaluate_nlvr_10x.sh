#!/usr/bin/env bash
# Evaluates UPop nlvr 10x (the released file, or CKPT=path). Published: dev 57.17, test-P 57.79; 54.48 M params, 19.08 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_10x_compressed.pth}" output/upop/nlvr_10x_eval "${infer[@]}" "$@"
