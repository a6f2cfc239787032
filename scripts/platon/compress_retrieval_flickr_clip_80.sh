#!/usr/bin/env bash
# PLATON CLIP Flickr30k retrieval 80 %: the ID paper's third task (train_clip_flickr30k.py with --pruner_name PLATON):
# CLIP ViT-L/14 at 336 px from the fine-tuned Flickr model, final_threshold 0.2 of the 108 masked Linears (attn.proj,
# mlp.fc1, mlp.fc2 of both towers, weights and biases), 5 epochs of ITC with momentum distillation.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr_clip.yaml 0.2 output/platon/retrieval_flickr_clip_80 "$@"
