"""BLIP pre-training (ITC + ITM + LM) on image-caption pairs; makes the demos' tiny pre-trained BLIP.

python pretrain.py --demo
"""

import cli
from tasks import pretrain as t

SPEC = cli.TaskSpec(
    name="pretrain",
    description=__doc__.splitlines()[0],
    schema=t.SCHEMA,
    default_config="configs/demo/pretrain.yaml",
    demo_config="configs/demo/pretrain.yaml",
    build_data=t.build_data,
    build_model=t.build_model,
    build_task=t.build_task,
    load_pretrained=t.load_pretrained,
)

if __name__ == "__main__":
    cli.main(SPEC)
