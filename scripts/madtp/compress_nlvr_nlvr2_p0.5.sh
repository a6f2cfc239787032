#!/usr/bin/env bash
# MADTP nlvr_nlvr2_p0.5: p = 0.5, 15 epochs at init_lr 3e-6 from the fine-tuned BLIP NLVR2 model (the seed's script). Released checkpoint and log: the seed README's table (paper numbers not in the spec).
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.5 15 output/madtp/nlvr_nlvr2_p0.5 --set init_lr=3e-6 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/model_base_nlvr.pth "$@"
