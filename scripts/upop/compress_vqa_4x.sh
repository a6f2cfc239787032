#!/usr/bin/env bash
# UPop vqa 4x: p = 0.75, 15 search + 15 retrain epochs on 8 GPUs. Published: test-dev 74.5, test-std 74.6 (EvalAI server); 133.3 M params, 62.3 G FLOPs.
exec "$(dirname "$0")/run.sh" compress vqa configs/vqa.yaml 0.75 15 output/upop/vqa_4x "$@"
