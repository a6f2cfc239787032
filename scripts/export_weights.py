"""Strip a training checkpoint down to its model weights (optionally fp16), for shipping or release.

    python scripts/export_weights.py output/demo/pretrain/checkpoint_best.pth \
        checkpoints/demo/blip_tiny_pretrain.pth --half

Tensors that share storage in the model (tied or shared modules) stay shared in the output file. ``--drop``
leaves out a module or a tensor, e.g. the 3-way head of text-assignment pre-training before NLVR2 fine-tuning (or
CLIP's momentum towers and queues, which a fine-tuning run starts afresh):

    python scripts/export_weights.py output/demo/text_assignment/checkpoint_last.pth \
        checkpoints/demo/blip_tiny_twin.pth --half --drop cls_head
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def export(src: str, dst: str, half: bool = False, drop: tuple[str, ...] = ()) -> dict:
    sd = utils.unwrap_state_dict(utils.load_checkpoint_file(src), src)
    if drop:
        names = tuple(p.rstrip(".") for p in drop)
        kept = {k: v for k, v in sd.items() if not (k in names or k.startswith(tuple(n + "." for n in names)))}
        if len(kept) == len(sd):
            raise KeyError(f"{src} has no keys under {', '.join(drop)}; nothing to drop")
        sd = kept
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
    p.add_argument(
        "--drop", action="append", default=[], metavar="MODULE", help="leave out a module's keys (repeatable)"
    )
    args = p.parse_args()
    sd = export(args.src, args.dst, args.half, tuple(args.drop))
    print(f"wrote {args.dst}: {len(sd)} tensors, {Path(args.dst).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
