"""Strip a training checkpoint down to its model weights (optionally fp16), for shipping or release.

    python scripts/export_weights.py output/demo/pretrain/checkpoint_best.pth \
        checkpoints/demo/blip_tiny_pretrain.pth --half

Tensors that share storage in the model (tied or shared modules) stay shared in the output file.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def export(src: str, dst: str, half: bool = False) -> dict:
    sd = utils.unwrap_state_dict(utils.load_checkpoint_file(src), src)
    converted: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, t in sd.items():
        if half and t.is_floating_point():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if ident not in converted:
                converted[ident] = t.half()
            t = converted[ident]
        out[key] = t
    utils.atomic_torch_save({"model": out}, dst)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="a checkpoint (training or model-only)")
    p.add_argument("dst", help="output .pth with {'model': state_dict}")
    p.add_argument("--half", action="store_true", help="store floating-point tensors as fp16")
    args = p.parse_args()
    sd = export(args.src, args.dst, args.half)
    print(f"wrote {args.dst}: {len(sd)} tensors, {Path(args.dst).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
