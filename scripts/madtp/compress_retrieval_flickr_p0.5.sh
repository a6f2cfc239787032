#!/usr/bin/env bash
# MADTP retrieval_flickr_p0.5: p = 0.5, 10 epochs at init_lr 1e-7; T calibrated from 0 (the seed's rule for p <= 0.5).
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr.yaml 0.5 10 output/madtp/retrieval_flickr_p0.5 --set init_lr=1e-7 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/model_base_retrieval_flickr.pth "$@"
