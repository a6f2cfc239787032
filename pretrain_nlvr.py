"""Text-assignment pre-training of the NLVR2 model (ALBEF's TA): which of two images a caption describes.

python pretrain_nlvr.py --demo
python scripts/export_weights.py output/demo/text_assignment/checkpoint_last.pth twin.pth --drop cls_head
python compress_nlvr.py --demo --pretrained twin.pth
"""

import cli

TASK = "text_assignment"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
