"""Does a UPop-compressed BLIP run as much faster as its FLOPs say? Dense vs compressed at real size.

Builds a task model at its real size with random weights (a preset of ``benchmarks.presets``), picks a
UPop architecture at ratio ``p`` with the magnitude ranking (any mask that meets the budget has the
same cost structure; no data or training is needed), slices it, and times both models in alternation
on the chosen device. The check of the project's UPop issue: the measured speed-up at batch 1 is at
least ``--min-fraction`` (0.8) of the FLOPs reduction.

    python -m benchmarks.upop_speed --preset blip-nlvr --p 0.5 --device cpu [--round-to 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks.measure import compare, markdown
from benchmarks.presets import PRESETS, build_preset
from pruners.upop import UPop


def upop_compressed(model: torch.nn.Module, p: float, round_to: int = 1, attn_cost: float = 36) -> torch.nn.Module:
    """A copy of ``model`` cut by UPop's unified ranking at ratio ``p`` (magnitude scores, final step)."""
    small = copy.deepcopy(model)
    pruner = UPop({"p": p, "upop": {"importance": "magnitude", "round_to": round_to, "attn_cost": attn_cost}})
    pruner.attach(small)
    pruner.update(p)
    pruner.compress(small)
    return small.eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="blip-nlvr", choices=sorted(PRESETS), help="real-size model (random weights)")
    ap.add_argument("--p", type=float, default=0.5, help="UPop ratio of the cost-weighted mask budget (0.5 = '2x')")
    ap.add_argument("--round-to", type=int, default=1, help="round kept widths up to a multiple of this")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per model")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per model (the median is reported)")
    ap.add_argument("--min-fraction", type=float, default=0.8, help="required speed-up / FLOPs-reduction")
    ap.add_argument("--out", default=None, help="folder for upop_speed.json and upop_speed.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    task, _, dense = build_preset(args.preset, device=args.device)
    small = upop_compressed(dense, args.p, args.round_to)
    report = compare(
        {"dense": dense, f"upop p={args.p}": small},
        task,
        batch_size=1,
        warmup=args.warmup,
        repeats=args.repeats,
        sources={"dense": f"preset {args.preset}", f"upop p={args.p}": f"magnitude ranking, round_to {args.round_to}"},
        log=print,
    )
    ratio = report["ratio"]
    flops_reduction = 1 / ratio["flops"]
    speedup = 1 / ratio["latency_ms"]
    report["check"] = {
        "flops_reduction": flops_reduction,
        "speedup_batch1": speedup,
        "fraction": speedup / flops_reduction,
        "required": args.min_fraction,
        "passed": speedup >= args.min_fraction * flops_reduction,
    }
    text = markdown(report)
    check = report["check"]
    text += (
        f"\nFLOPs reduction x{flops_reduction:.3f}, batch-1 speed-up x{speedup:.3f}: "
        f"{check['fraction']:.2f} of the FLOPs reduction (required {args.min_fraction}) -> "
        f"{'PASS' if check['passed'] else 'FAIL'}\n"
    )
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "upop_speed.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out / "upop_speed.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
