"""COCO / Flickr30k image-text retrieval with BLIP: fine-tune, compress or evaluate (recall@1/5/10).

python compress_retrieval.py --demo
torchrun --nproc_per_node=8 compress_retrieval.py --config configs/retrieval_coco.yaml
"""

import cli
from tasks import retrieval

SPEC = cli.TaskSpec.from_module(retrieval, "configs/retrieval_coco.yaml", "configs/demo/retrieval.yaml", __doc__)

if __name__ == "__main__":
    cli.main(SPEC)
