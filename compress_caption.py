"""COCO captioning with BLIP: fine-tune, compress or evaluate (BLEU-4, METEOR, ROUGE-L, CIDEr).

python compress_caption.py --demo
torchrun --nproc_per_node=8 compress_caption.py --config configs/caption_coco.yaml
"""

import cli
from tasks import caption

SPEC = cli.TaskSpec.from_module(caption, "configs/caption_coco.yaml", "configs/demo/caption.yaml", __doc__)

if __name__ == "__main__":
    cli.main(SPEC)
