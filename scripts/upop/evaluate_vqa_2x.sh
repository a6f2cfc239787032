#!/usr/bin/env bash
# Evaluates UPop vqa 2x (the released file, or CKPT=path). Published: test-dev 76.3, test-std 76.3 (EvalAI server); 211.3 M params, 109.4 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate vqa configs/vqa.yaml "${CKPT:-pretrained/model_base_vqa_capfilt_large_vqa2_2x_compressed.pth}" output/upop/vqa_2x_eval "${infer[@]}" "$@"
