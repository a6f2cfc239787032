"""Convert CLIP weights between the layouts people hold: OpenAI / open_clip (and the UPop / MADTP forks' files), Hugging
Face ``CLIPModel`` folders, and this project's own names.

OpenAI's ``.pt`` release files are TorchScript archives; reading one deserialises code, so this script (like every
loader here) refuses them unless ``--trust-torchscript`` is given. Converting once gives a plain safetensors file that
loads anywhere without that flag:

  python scripts/convert_clip.py ViT-L-14-336px.pt pretrained/clip_l14_336.safetensors --trust-torchscript
  python scripts/convert_clip.py output/retrieval_clip/checkpoint_best.pth exported/clip_hf --to hf
  python scripts/convert_clip.py output/upop/model_compressed.safetensors exported/clip.safetensors --to openai

``--to``: ``ours`` (default), ``openai`` (the open_clip / fork keys; ``--momentum`` keeps the forks' momentum twins and
queues) or ``hf`` (a folder; dense models only, since ``CLIPModel`` has one width per tower). Files are
``.safetensors`` (an architecture description, when the source has one, goes beside it as ``<stem>.json``) or ``.pth``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.clip_checkpoints import LAYOUTS, infer_arch, read_clip_weights, save_hf, save_weights  # noqa: E402
from utils import CheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", help="a CLIP file (.pt, .pth, .bin, .safetensors) or a Hugging Face folder")
    ap.add_argument("output", help="the file (ours / openai) or folder (hf) to write")
    ap.add_argument("--to", default="ours", choices=LAYOUTS, help="layout of the output (default: ours)")
    ap.add_argument("--trust-torchscript", action="store_true", help="read a TorchScript .pt archive (runs its code)")
    ap.add_argument("--momentum", action="store_true", help="openai: keep momentum twins and queues when present")
    ap.add_argument(
        "--act", default=None, choices=("quick_gelu", "gelu"), help="hf: activation (default: the source's)"
    )
    args = ap.parse_args(argv)
    try:
        sd, description, facts = read_clip_weights(args.source, args.trust_torchscript)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise SystemExit(f"error: {out} exists; remove it or choose another output")
    if args.to == "hf":
        arch = infer_arch(sd, args.source, act=args.act or facts.get("act", "quick_gelu"))
        try:
            save_hf(sd, arch, out, description)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        if out.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise SystemExit(f"error: {out}: name the output .safetensors or .pth")
        save_weights(sd, out, args.to, description, momentum=args.momentum or args.to == "ours")
    print(json.dumps({"source": args.source, "layout": facts["layout"], "to": args.to, "output": str(out)}))
    return out


if __name__ == "__main__":
    main()
