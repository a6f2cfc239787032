"""ImageNet classification with a ViT/DeiT backbone: fine-tune, compress or evaluate.

python compress_classification.py --demo
torchrun --nproc_per_node=8 compress_classification.py --config configs/deit_imagenet.yaml
"""

import cli
from tasks import classification

SPEC = cli.TaskSpec.from_module(
    classification, "configs/deit_imagenet.yaml", "configs/demo/classification.yaml", __doc__
)

if __name__ == "__main__":
    cli.main(SPEC)
