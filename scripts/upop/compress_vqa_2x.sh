#!/usr/bin/env bash
# UPop vqa 2x: p = 0.5, 10 search + 10 retrain epochs on 8 GPUs. Published: test-dev 76.3, test-std 76.3 (EvalAI server); 211.3 M params, 109.4 G FLOPs.
exec "$(dirname "$0")/run.sh" compress vqa configs/vqa.yaml 0.5 10 output/upop/vqa_2x "$@"
