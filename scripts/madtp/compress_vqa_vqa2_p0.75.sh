#!/usr/bin/env bash
# MADTP vqa_vqa2_p0.75: p = 0.75, 3 epochs at init_lr 2e-5, T from 0.5 (see the p0.5 script for the seed's open loop).
exec "$(dirname "$0")/run.sh" compress vqa configs/vqa.yaml 0.75 3 output/madtp/vqa_vqa2_p0.75 --set init_lr=2e-5 --set batch_size_train=16 --set batch_size_test=16 --pretrained pretrained/model_base_vqa_capfilt_large.pth "$@"
