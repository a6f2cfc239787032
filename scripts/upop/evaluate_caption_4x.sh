#!/usr/bin/env bash
# Evaluates UPop caption 4x (the released file, or CKPT=path). Published: CIDEr 117.4, SPICE 21.7; 76.5 M params, 22.2 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate caption configs/caption_coco.yaml "${CKPT:-pretrained/model_base_caption_capfilt_large_coco_4x_compressed.pth}" output/upop/caption_4x_eval "${infer[@]}" "$@"
