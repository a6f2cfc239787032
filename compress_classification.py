"""ImageNet classification with a ViT/DeiT backbone: fine-tune, compress or evaluate.

python compress_classification.py --demo
torchrun --nproc_per_node=8 compress_classification.py --config configs/deit_imagenet.yaml
"""

import cli

TASK = "classification"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
