"""Does a compressed model run as much faster as its FLOPs say? Dense against compressed at real size.

Builds a task model at its real size with random weights (a preset of ``benchmarks.presets``), compresses a copy
with one method (no data or training is needed: costs do not depend on the weights), and times both in
alternation on the chosen device:

* ``upop``: UPop's architecture at ratio ``--p`` with the magnitude ranking at the final step, sliced
  (``--ranking uniform``: every structure keeps the same share instead; random weights give magnitudes that rank
  one tower's attention far below the other's where their initialisations differ, as CLIP's do);
* ``evit``: EViT reducers at ``--locations`` (default 3, 6, 9) with ``--keep-rate``, or the keep rate that
  removes ``--p`` of the FLOPs;
* ``tome``: ToMe reducers merging ``--r`` tokens in every block (or a constant r solved from ``--p``);
* ``madtp``: MADTP reducers in every block of every tower (100 random alignment tokens; CLIP with its per-block
  projections) at ``--temperature``, or the temperature whose kept tokens remove ``--p`` of the FLOPs of the
  inference call at ``--batch`` (found by bisection; the keep counts are batch maxima, so the FLOPs depend on the
  batch and are measured at the batch that is timed);
* ``upop+madtp``: UPop at ``--upop-p`` (the ``--ranking`` above), then MADTP on the compressed model as above;
* ``uvc`` (DeiT): a valid UVC selection at ``--budget`` (blocks skipped, heads, value coordinates and neurons
  removed), materialised;
* ``pumer`` (ViLT): PuMer reducers at ``--reduce-layers`` with ``--prune-r``, ``--merge-r``, ``--merge-text``
  (default: the released VQA setting, p 0.1, r 0.3, t 0.2 at blocks 2, 5, 8).

The check: the measured speed-up (latency at batch 1, and throughput at ``--batch``) is at least
``--min-fraction`` of the FLOPs reduction.

    python -m benchmarks.speed upop --preset blip-nlvr --p 0.5 --device cpu
    python -m benchmarks.speed evit --preset blip-nlvr --p 0.5 --device cpu
    python -m benchmarks.speed tome --preset deit-small --r 13 --device cpu --batch 16
    python -m benchmarks.speed madtp --preset blip-nlvr --p 0.5 --device cpu --batch 8
    python -m benchmarks.speed pumer --preset vilt-vqa --device cpu --batch 32
    python -m benchmarks.speed uvc --preset deit-small --budget 0.5 --device cpu --batch 16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from benchmarks.measure import compare, markdown
from benchmarks.presets import PRESETS, build_preset

__all__ = ["compressed_copy", "main"]


def compressed_copy(model: nn.Module, method: str, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """A copy of ``model`` compressed by ``method`` with the settings in ``args``, and a line saying how."""
    from pruners.evit import EViT
    from pruners.tome import ToMe
    from pruners.upop import UPop

    small = copy.deepcopy(model)
    if method in ("upop", "upop+madtp"):
        pruner = UPop({"p": args.p, "upop": {"importance": "magnitude", "round_to": args.round_to, "attn_cost": 36}})
        pruner.attach(small)
        if args.ranking == "uniform":
            # Every searched structure keeps its first ceil((1 - p) n) entries: UPop's budget met in every block.
            with torch.no_grad():
                for m in pruner.masks:
                    m.zero_()[: max(1, math.ceil((1 - args.p) * m.numel()))] = 1
            pruner.p_t = args.p
        else:
            pruner.update(args.p)
        budget = pruner.budget()["ratio"]
        pruner.compress(small)
        how = f"UPop p={args.p}, {args.ranking} ranking, round_to {args.round_to} (mask budget {budget:.3f})"
        if method == "upop+madtp":
            how += "; then " + _madtp(small, args)
    elif method == "madtp":
        how = _madtp(small, args)
    elif method == "pumer":
        from pruners.pumer import PuMer

        options = {"prune_r": args.prune_r, "merge_r": args.merge_r, "merge_text": args.merge_text}
        pruner = PuMer({"pumer": {**options, "reduce_layers": args.reduce_layers}})
        pruner.attach(small)
        how = f"PuMer p {args.prune_r} r {args.merge_r} t {args.merge_text} at blocks {args.reduce_layers}"
    elif method == "uvc":
        how = _uvc(small, args)
    elif method == "evit":
        options = {"locations": args.locations, "keep_rate": None if args.p is not None else args.keep_rate}
        pruner = EViT({"p": args.p, "evit": options})
        pruner.attach(small)
        how = f"EViT keep rate {pruner.target} at blocks {args.locations}"
    else:
        pruner = ToMe({"p": args.p, "tome": {"r": None if args.p is not None else args.r, "prop_attn": True}})
        pruner.attach(small)
        how = f"ToMe r={pruner.r} in every block"
    return small.eval(), how


def _uvc(model: nn.Module, args: argparse.Namespace) -> str:
    """A valid UVC selection at ``--budget`` (the weights are random, so no search): every third block skipped, one
    head and ``--uvc-dims`` value coordinates of every other head removed, and the MLP width that meets the budget
    (bisection on the deterministic R), then materialised as the search's end does."""
    from pruners.uvc import UVC

    pruner = UVC({"uvc": {"budget": args.budget, "resource": "materialised", "select_by": "last"}})
    pruner.attach(model)
    pruner.warm = False
    geo = pruner.geo
    with torch.no_grad():
        for i in range(2, geo.depth, 3):
            pruner.gates[i] = torch.tensor([1.0, -1.0])
    pruner.s[:, 0] = 1
    pruner.r[:] = args.uvc_dims
    lo, hi = 0.0, geo.hidden - 1.0
    for _ in range(40):
        pruner.s[:, 1] = (lo + hi) / 2
        pruner.refresh_selection()
        lo, hi = (
            (pruner.s[0, 1].item(), hi)
            if pruner.deterministic_resource() > args.budget
            else (lo, pruner.s[0, 1].item())
        )
    pruner.s[:, 1] = hi
    pruner.materialise(model)
    return (
        f"UVC at budget {args.budget}: blocks {pruner.final['skipped']} skipped, 1 head and {args.uvc_dims} value dims "
        f"per head removed, {math.ceil(hi)} neurons removed per block (R {pruner.final['R_materialised']:.4f} as built)"
    )


def _madtp(model: nn.Module, args: argparse.Namespace) -> str:
    """MADTP reducers on ``model`` (in place) at ``args.temperature``, or at the temperature whose kept tokens remove
    ``args.madtp_p`` of the FLOPs of the inference call at ``args.batch``; returns a line saying how."""
    from benchmarks.measure import speed_cost
    from models.madtp import reducer_plan
    from models.madtp import reducers as madtp_reducers
    from models.token_ops import attach_reducers

    clip = hasattr(model, "visual")  # CLIP's towers differ in width: per-block projections to 768, as the seed
    width = None if clip else model.visual_encoder.embed_dim
    attach_reducers(model, reducer_plan(model, 0.0, 100, 768 if clip else width, q_map=clip), "madtp")
    reducers = madtp_reducers(model)

    def cost(t: float) -> float:
        for r in reducers:
            r.temperature = t
        return speed_cost(model, args.batch)["macs"]

    dense = cost(0.0)
    if args.temperature is not None:
        t = args.temperature
    else:  # the kept share falls as T grows: bisection in log T
        lo, hi = 1e-3, 1e4
        for _ in range(args.search_steps):
            t = math.sqrt(lo * hi)
            lo, hi = (t, hi) if cost(t) > (1 - args.madtp_p) * dense else (lo, t)
        t = math.sqrt(lo * hi)
    ratio = cost(t) / dense
    return f"MADTP T={t:.4g} in {len(reducers)} blocks (FLOPs at batch {args.batch}: x{ratio:.3f} of before MADTP)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "method",
        choices=("upop", "evit", "tome", "madtp", "upop+madtp", "pumer", "uvc"),
        help="the compression method",
    )
    ap.add_argument("--preset", default="blip-nlvr", choices=sorted(PRESETS), help="real-size model (random weights)")
    ap.add_argument("--p", type=float, default=None, help="upop: mask budget share; evit / tome: FLOPs share to remove")
    ap.add_argument("--round-to", type=int, default=1, help="upop: round kept widths up to a multiple of this")
    ap.add_argument(
        "--ranking",
        default="magnitude",
        choices=("magnitude", "uniform"),
        help="upop: the mask at --p from the weights' magnitudes, or the same share kept in every structure",
    )
    ap.add_argument("--keep-rate", type=float, default=0.7, help="evit: kept share of tokens at each location")
    ap.add_argument("--locations", type=int, nargs="+", default=[3, 6, 9], help="evit: blocks that reduce")
    ap.add_argument("--r", type=int, default=8, help="tome: tokens merged per block")
    ap.add_argument("--temperature", type=float, default=None, help="madtp: the temperature (default: solved from --p)")
    ap.add_argument("--upop-p", type=float, default=0.5, help="upop+madtp: UPop's mask budget share")
    ap.add_argument("--search-steps", type=int, default=10, help="madtp: bisection steps for the temperature")
    ap.add_argument("--prune-r", type=float, default=0.1, help="pumer: share of image tokens pruned per layer")
    ap.add_argument("--merge-r", type=float, default=0.3, help="pumer: image merge share")
    ap.add_argument("--merge-text", type=float, default=0.2, help="pumer: text merge share")
    ap.add_argument("--reduce-layers", type=int, nargs="+", default=[2, 5, 8], help="pumer: blocks that reduce")
    ap.add_argument("--budget", type=float, default=0.5, help="uvc: share of the dense MACs kept")
    ap.add_argument("--uvc-dims", type=int, default=16, help="uvc: value coordinates removed in every kept head")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=1, help="throughput batch (1: latency only)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per model")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per model (the median is reported)")
    ap.add_argument("--min-fraction", type=float, default=0.85, help="required speed-up / FLOPs reduction")
    ap.add_argument("--out", default=None, help="folder for speed_<method>.json and .md")
    args = ap.parse_args(argv)
    if args.method == "upop" and args.p is None:
        args.p = 0.5
    if "madtp" in args.method:  # --p is MADTP's FLOPs share; UPop's budget of the combination is --upop-p
        args.madtp_p = 0.5 if args.p is None else args.p
        if args.method == "upop+madtp":
            args.p = args.upop_p
    if args.threads:
        torch.set_num_threads(args.threads)

    task, _, dense = build_preset(args.preset, device=args.device)
    small, how = compressed_copy(dense, args.method, args)
    label = args.method
    report = compare(
        {"dense": dense, label: small},
        task,
        batch_size=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        sources={"dense": f"preset {args.preset}", label: how},
        log=print,
    )
    ratio = report["ratio"]
    flops_reduction = 1 / ratio["flops"]
    speedups = {"latency (batch 1)": 1 / ratio["latency_ms"], f"throughput (batch {args.batch})": ratio["throughput"]}
    if "madtp" in args.method:
        # Keep counts are batch maxima: the FLOPs to compare with are those of the timed call at the timed batch.
        from benchmarks.measure import speed_cost

        at_batch = {k: speed_cost(m, args.batch)["flops"] for k, m in (("dense", dense), (label, small))}
        report["speed_flops"] = {"batch": args.batch, **at_batch}
        flops_reduction = at_batch["dense"] / at_batch[label]
        speedups = {f"throughput (batch {args.batch})": ratio["throughput"]}
    report["check"] = {
        "flops_reduction": flops_reduction,
        "speedups": speedups,
        "fractions": {k: v / flops_reduction for k, v in speedups.items()},
        "required": args.min_fraction,
        "passed": all(v >= args.min_fraction * flops_reduction for v in speedups.values()),
    }
    text = markdown(report) + f"\n{how}: FLOPs reduction x{flops_reduction:.3f}; "
    text += "; ".join(f"{k} speed-up x{v:.3f} ({v / flops_reduction:.2f} of it)" for k, v in speedups.items())
    text += f" (required {args.min_fraction}) -> {'PASS' if report['check']['passed'] else 'FAIL'}\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"speed_{label}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out / f"speed_{label}.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
