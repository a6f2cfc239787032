"""VQAv2 with BLIP: fine-tune, compress or evaluate (server result file; local accuracy if answers known).

python compress_vqa.py --demo
torchrun --nproc_per_node=8 compress_vqa.py --config configs/vqa.yaml
"""

import cli
from tasks import vqa as t

SPEC = cli.TaskSpec(
    name="vqa",
    description=__doc__.splitlines()[0],
    schema=t.SCHEMA,
    default_config="configs/vqa.yaml",
    demo_config="configs/demo/vqa.yaml",
    build_data=t.build_data,
    build_model=t.build_model,
    build_task=t.build_task,
    load_pretrained=t.load_pretrained,
)

if __name__ == "__main__":
    cli.main(SPEC)
