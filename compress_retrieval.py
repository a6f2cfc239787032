"""COCO / Flickr30k image-text retrieval with BLIP: fine-tune, compress or evaluate (recall@1/5/10).

python compress_retrieval.py --demo
torchrun --nproc_per_node=8 compress_retrieval.py --config configs/retrieval_coco.yaml
"""

import cli
from tasks import retrieval as t

SPEC = cli.TaskSpec(
    name="retrieval",
    description=__doc__.splitlines()[0],
    schema=t.SCHEMA,
    default_config="configs/retrieval_coco.yaml",
    demo_config="configs/demo/retrieval.yaml",
    build_data=t.build_data,
    build_model=t.build_model,
    build_task=t.build_task,
    load_pretrained=t.load_pretrained,
)

if __name__ == "__main__":
    cli.main(SPEC)
