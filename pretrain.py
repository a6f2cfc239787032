"""BLIP pre-training (ITC + ITM + LM) on image-caption pairs; makes the demos' tiny pre-trained BLIP.

python pretrain.py --demo
"""

import cli

TASK = "pretrain"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
