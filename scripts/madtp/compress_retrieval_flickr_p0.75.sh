#!/usr/bin/env bash
# MADTP retrieval_flickr_p0.75: the seed's "p0.75" script passes --p 0.65; at p > 0.5 the seed starts at T = 2 without calibrating.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr.yaml 0.65 10 output/madtp/retrieval_flickr_p0.75 --set init_lr=1e-7 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/model_base_retrieval_flickr.pth --set madtp.calibrate=null --set madtp.temperature_init=2.0 "$@"
