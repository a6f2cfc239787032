#!/usr/bin/env bash
# Evaluates MADTP nlvr_nlvr2_p0.6 (the seed's released file, or CKPT=path; default pretrained/model_base_nlvr_nlvr2_p0.6_compressed.pth).
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/nlvr.yaml "${CKPT:-pretrained/model_base_nlvr_nlvr2_p0.6_compressed.pth}" output/madtp/nlvr_nlvr2_p0.6_eval --set batch_size_test=32 "$@"
