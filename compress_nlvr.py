"""NLVR2 with BLIP: fine-tune, compress or evaluate (accuracy on dev and test-P).

python compress_nlvr.py --demo
torchrun --nproc_per_node=8 compress_nlvr.py --config configs/nlvr.yaml
"""

import cli
from tasks import nlvr as t

SPEC = cli.TaskSpec(
    name="nlvr",
    description=__doc__.splitlines()[0],
    schema=t.SCHEMA,
    default_config="configs/nlvr.yaml",
    demo_config="configs/demo/nlvr.yaml",
    build_data=t.build_data,
    build_model=t.build_model,
    build_task=t.build_task,
    load_pretrained=t.load_pretrained,
)

if __name__ == "__main__":
    cli.main(SPEC)
