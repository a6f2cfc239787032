#!/usr/bin/env bash
# MADTP retrieval_flickr_clip_p0.5: CLIP ViT-L/14@336; the seed's "p0.5" script passes --p 0.55 (target 178.06 GFLOPs), 5 epochs (its README says 10).
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr_clip.yaml 0.55 5 output/madtp/retrieval_flickr_clip_p0.5 --set init_lr=1e-5 --set weight_decay=0.2 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/clip_large_retrieval_flickr.pth "$@"
