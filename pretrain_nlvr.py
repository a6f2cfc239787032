"""Text-assignment pre-training of the NLVR2 model (ALBEF's TA): which of two images a caption describes.

python pretrain_nlvr.py --demo
python scripts/export_weights.py output/demo/text_assignment/checkpoint_last.pth twin.pth --drop cls_head
python compress_nlvr.py --demo --pretrained twin.pth
"""

import cli
from tasks import text_assignment

SPEC = cli.TaskSpec.from_module(
    text_assignment, "configs/demo/text_assignment.yaml", "configs/demo/text_assignment.yaml", __doc__
)

if __name__ == "__main__":
    cli.main(SPEC)
