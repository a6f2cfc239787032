#!/usr/bin/env bash
# Evaluates MADTP nlvr_nlvr2_p0.8 (the seed's released file, or CKPT=path; default pretrained/model_base_nlvr_nlvr2_p0.8_compressed.pth).
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_p0.8_compressed.pth}" output/madtp/nlvr_nlvr2_p0.8_eval --set batch_size_test=32 "$@"
