#!/usr/bin/env bash
# Evaluates UPop vqa 4x (the released file, or CKPT=path). Published: test-dev 74.5, test-std 74.6 (EvalAI server); 133.3 M params, 62.3 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate vqa configs/vqa.yaml "${CKPT:-pretrained/model_base_vqa_capfilt_large_vqa2_4x_compressed.pth}" output/upop/vqa_4x_eval "${infer[@]}" "$@"
