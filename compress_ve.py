"""SNLI-VE (visual entailment) with ViLT: fine-tune, compress or evaluate (accuracy on dev and test).

python compress_ve.py --demo
torchrun --nproc_per_node=8 compress_ve.py --config configs/vilt_ve.yaml
"""

import cli

TASK = "ve"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
