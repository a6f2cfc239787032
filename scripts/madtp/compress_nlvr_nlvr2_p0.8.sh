#!/usr/bin/env bash
# MADTP nlvr_nlvr2_p0.8: p = 0.8, 25 epochs at init_lr 3e-6 (the seed's script). Published (abstract): 80 % fewer GFLOPs with < 4 % accuracy drop.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.8 25 output/madtp/nlvr_nlvr2_p0.8 --set init_lr=3e-6 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/model_base_nlvr.pth "$@"
