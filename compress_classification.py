"""ImageNet classification with a ViT/DeiT backbone: fine-tune, compress or evaluate.

python compress_classification.py --demo
torchrun --nproc_per_node=8 compress_classification.py --config configs/deit_imagenet.yaml
"""

import cli
from tasks import classification as t

SPEC = cli.TaskSpec(
    name="classification",
    description=__doc__.splitlines()[0],
    schema=t.SCHEMA,
    default_config="configs/deit_imagenet.yaml",
    demo_config="configs/demo/classification.yaml",
    build_data=t.build_data,
    build_model=t.build_model,
    build_task=t.build_task,
    load_pretrained=t.load_pretrained,
)

if __name__ == "__main__":
    cli.main(SPEC)
