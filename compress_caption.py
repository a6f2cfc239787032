"""COCO captioning with BLIP: fine-tune, compress or evaluate (BLEU-4, METEOR, ROUGE-L, CIDEr).

python compress_caption.py --demo
torchrun --nproc_per_node=8 compress_caption.py --config configs/caption_coco.yaml
"""

import cli

TASK = "caption"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
