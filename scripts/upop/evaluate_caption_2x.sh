#!/usr/bin/env bash
# Evaluates UPop caption 2x (the released file, or CKPT=path). Published: CIDEr 128.9, SPICE 23.3; 127.1 M params, 39.8 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate caption configs/caption_coco.yaml "${CKPT:-pretrained/model_base_caption_capfilt_large_coco_2x_compressed.pth}" output/upop/caption_2x_eval "${infer[@]}" "$@"
