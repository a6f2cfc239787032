"""NLVR2 with BLIP: fine-tune, compress or evaluate (accuracy on dev and test-P).

python compress_nlvr.py --demo
torchrun --nproc_per_node=8 compress_nlvr.py --config configs/nlvr.yaml
"""

import cli
from tasks import nlvr

SPEC = cli.TaskSpec.from_module(nlvr, "configs/nlvr.yaml", "configs/demo/nlvr.yaml", __doc__)

if __name__ == "__main__":
    cli.main(SPEC)
