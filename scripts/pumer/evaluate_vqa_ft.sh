#!/usr/bin/env bash
# Evaluates the ViLT VQAv2 -ft model (val2014 locally; test-dev via the EvalAI file under result/).
exec "$(dirname "$0")/run.sh" evaluate vqa configs/vilt_vqa.yaml ${CKPT:-output/vqa_vilt/checkpoint_best.pth} output/vqa_vilt "$@"
