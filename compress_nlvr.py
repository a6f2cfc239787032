"""NLVR2 with BLIP: fine-tune, compress or evaluate (accuracy on dev and test-P).

python compress_nlvr.py --demo
torchrun --nproc_per_node=8 compress_nlvr.py --config configs/nlvr.yaml
"""

import cli

TASK = "nlvr"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
