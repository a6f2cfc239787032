"""VQAv2 with BLIP: fine-tune, compress or evaluate (server result file; local accuracy if answers known).

python compress_vqa.py --demo
torchrun --nproc_per_node=8 compress_vqa.py --config configs/vqa.yaml
"""

import cli
from tasks import vqa

SPEC = cli.TaskSpec.from_module(vqa, "configs/vqa.yaml", "configs/demo/vqa.yaml", __doc__)

if __name__ == "__main__":
    cli.main(SPEC)
