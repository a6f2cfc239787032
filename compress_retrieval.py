"""COCO / Flickr30k image-text retrieval with BLIP: fine-tune, compress or evaluate (recall@1/5/10).

python compress_retrieval.py --demo
torchrun --nproc_per_node=8 compress_retrieval.py --config configs/retrieval_coco.yaml
"""

import cli

TASK = "retrieval"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
