"""VQAv2 with BLIP: fine-tune, compress or evaluate (server result file; local accuracy if answers known).

python compress_vqa.py --demo
torchrun --nproc_per_node=8 compress_vqa.py --config configs/vqa.yaml
"""

import cli

TASK = "vqa"  # the backbone comes from the config (tasks/registry.py)

if __name__ == "__main__":
    cli.main(TASK, __doc__)
