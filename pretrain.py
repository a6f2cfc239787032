"""BLIP pre-training (ITC + ITM + LM) on image-caption pairs; makes the demos' tiny pre-trained BLIP.

python pretrain.py --demo
"""

import cli
from tasks import pretrain

SPEC = cli.TaskSpec.from_module(pretrain, "configs/demo/pretrain.yaml", "configs/demo/pretrain.yaml", __doc__)

if __name__ == "__main__":
    cli.main(SPEC)
