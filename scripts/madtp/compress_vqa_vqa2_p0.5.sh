#!/usr/bin/env bash
# MADTP vqa_vqa2_p0.5: p = 0.5, 3 epochs at init_lr 2e-5, T from 0.5. The seed's controller never sees a cost (T 0.5, 0.75, 1.0): add --set madtp.parity_open_loop=true to reproduce it. Answers for the EvalAI server in result/.
exec "$(dirname "$0")/run.sh" compress vqa configs/vqa.yaml 0.5 3 output/madtp/vqa_vqa2_p0.5 --set init_lr=2e-5 --set batch_size_train=16 --set batch_size_test=16 --pretrained pretrained/model_base_vqa_capfilt_large.pth "$@"
