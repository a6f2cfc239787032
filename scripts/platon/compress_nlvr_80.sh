#!/usr/bin/env bash
# PLATON NLVR2 80 %: BLIP NLVR (fine-tuned) pruned to 20 % of its 222 masked Linears while fine-tuning 10 epochs
# on 2 GPUs (cubic ramp over epochs 1-5, final ratio in epochs 6-10).
# The seed: train_nlvr.py --final_threshold 0.2 --pruner_name PLATON (its default there is Taylor). Published: see README.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.2 output/platon/nlvr_80 "$@"
