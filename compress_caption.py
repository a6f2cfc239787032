"""COCO captioning with BLIP: fine-tune, compress or evaluate (BLEU-4, METEOR, ROUGE-L, CIDEr).

python compress_caption.py --demo
torchrun --nproc_per_node=8 compress_caption.py --config configs/caption_coco.yaml
"""

import cli
from tasks import caption as t

SPEC = cli.TaskSpec(
    name="caption",
    description=__doc__.splitlines()[0],
    schema=t.SCHEMA,
    default_config="configs/caption_coco.yaml",
    demo_config="configs/demo/caption.yaml",
    build_data=t.build_data,
    build_model=t.build_model,
    build_task=t.build_task,
    load_pretrained=t.load_pretrained,
)

if __name__ == "__main__":
    cli.main(SPEC)
