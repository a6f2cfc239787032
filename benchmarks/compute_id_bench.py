"""Time, passes and peak memory of ``compute_id.py``, and what the seed's ComputeID.py would store.

    python benchmarks/compute_id_bench.py                  # everything below, a markdown table + JSON
    python benchmarks/compute_id_bench.py --skip-demo      # only the BLIP-base and storage parts

Parts (each compute_id run is a subprocess; its peak RSS comes from its own ``run.json``):

1. ``demo``: the tiny demo captioner (``--demo``) at n = 2000, one pass (default budget), then again
   with a budget that forces about three passes: the memory / time trade-off of grouped passes.
2. ``base``: BLIP-base captioning at 384 px (configs/med_config.json + ViT-B/16) with random weights,
   on a few samples (``--base-n``), under a small ``--max-memory`` so several passes are made.
3. ``distances``: float64 Gram throughput of ``pairwise_distances`` and the seed estimator's time, at
   n = 2000, to extrapolate the TwoNN stage.
4. ``storage``: activation bytes per module at BLIP-base sizes from the module shapes: the seed's
   on-disk need (text padded to 40 tokens, BLIP's decoder truncation) and ours, and the number of
   passes a given budget needs at n = 2000.

The extrapolation to n = 2000 at BLIP-base is printed apart from the measured numbers: forward time
scales with n per pass, the Gram stage with n^2 x (sum of widths), block analysis with n^2 per module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pruners.intrinsic_dim import DEFAULT_CHUNK_BYTES, format_bytes, pairwise_distances, plan_groups, seed_id  # noqa: E402

BASE_SETS = [
    "med_config=configs/med_config.json",
    "vit_patch_size=null",
    "vit_embed_dim=null",
    "vit_depth=null",
    "vit_heads=null",
    "image_size=384",
]


def run_compute_id(args: list[str], out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    t0 = time.time()
    cmd = [sys.executable, str(REPO / "compute_id.py"), *args, "--output", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"compute_id failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    run["wall_s"] = round(wall, 1)
    run["args"] = " ".join(["python compute_id.py", *args])
    run["log"] = [line for line in p.stderr.splitlines() if line.startswith(("pass ", "compute_id:"))]
    return run


def summarise(name: str, run: dict) -> dict:
    return {
        "case": name,
        "command": run["args"],
        "n": run["n"],
        "modules": run["modules"],
        "passes": run["passes"],
        "forward_s": run["forward_s"],
        "twonn_s": run["estimate_s"],
        "wall_s": run["wall_s"],
        "peak_activations": run["peak_activation_bytes"],
        "distance_reserve": run["distance_reserve_bytes"],
        "peak_rss": run["peak_rss_bytes"],
        "max_memory": run["max_memory_bytes"],
    }


def demo_runs(tmp: Path, n: int) -> list[dict]:
    one = run_compute_id(["--demo", "--cpu", "-n", str(n)], tmp / "demo1")
    # A budget that holds about a third of the activations (plus the distance work) forces ~3 passes.
    third = one["distance_reserve_bytes"] + one["peak_activation_bytes"] // 3
    many = run_compute_id(["--demo", "--cpu", "-n", str(n), "--max-memory", str(third)], tmp / "demo3")
    same = json.loads((tmp / "demo1" / "ids.json").read_text()) == json.loads((tmp / "demo3" / "ids.json").read_text())
    rows = [summarise("demo, one pass", one), summarise("demo, budget ~1/3", many)]
    rows[1]["ids_equal_to_one_pass"] = same
    return rows


def base_run(tmp: Path, n: int, budget: str) -> dict:
    args = ["--demo", "--cpu", "--pretrained", "", "-n", str(n), "--estimator", "textbook", "--max-memory", budget]
    for s in BASE_SETS:
        args += ["--set", s]
    run = run_compute_id(args, tmp / "base")
    row = summarise("BLIP-base 384 px, random weights", run)
    row["log"] = run["log"]
    return row


def distance_rates(n: int = 2000, width: int = 2**16) -> dict:
    x = torch.randn(n, width)
    pairwise_distances(x[:64, :256])  # warm-up
    t0 = time.time()
    d = pairwise_distances(x)
    gram_s = time.time() - t0
    t0 = time.time()
    seed_id(d, np.random.RandomState(999))
    block_s = time.time() - t0
    return {
        "n": n,
        "width": width,
        "pairwise_s": round(gram_s, 2),
        "gflops_fp64": round(2 * n * n * width / gram_s / 1e9, 1),
        "seed_block_analysis_s": round(block_s, 2),
    }


def base_shapes(text_tokens: int) -> list[tuple[str, str, int]]:
    """(name, modality, elements per sample) of every BLIP-base caption target at 384 px."""
    from models.blip_caption import BlipCaption
    from pruners.targets import targets

    with tempfile.TemporaryDirectory() as tok:
        specials = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        (Path(tok) / "vocab.txt").write_text("\n".join(specials) + "\n")
        cfg = {"vit": "base", "med_config": str(REPO / "configs/med_config.json"), "tokenizer": tok}
        with torch.device("meta"):
            model = BlipCaption(cfg, 384)
    modules = dict(model.named_modules())
    image_tokens = (384 // 16) ** 2 + 1
    return [
        (t.name, t.modality, (image_tokens if t.tokens == "image" else text_tokens) * modules[t.name].out_features)
        for t in targets(model)
    ]


def storage(n: int, budgets: list[int], text_tokens: int) -> dict:
    """The seed's float32 activation files for n samples, and our passes for each budget.

    Ours keeps the same representation in memory, each batch padded only to its own longest
    caption, so the seed's bytes (all text at ``text_tokens``) bound ours from above.
    """
    shapes = base_shapes(text_tokens)
    parts = {"vision": 0, "text (cross-attention K/V)": 0, "text (other)": 0}
    for name, modality, width in shapes:
        kv = ".crossattention.self." in name and name.endswith((".key", ".value"))
        key = "vision" if modality == "vision" else "text (cross-attention K/V)" if kv else "text (other)"
        parts[key] += 4 * n * width
    sizes = {name: 4 * n * width for name, _, width in shapes}
    widest = max(w for _, _, w in shapes)
    reserve = 17 * n * n + 32 * n * min(widest, DEFAULT_CHUNK_BYTES // (8 * n))
    return {
        "n": n,
        "text_tokens": text_tokens,
        "seed_disk": {k: format_bytes(v) for k, v in parts.items()} | {"total": format_bytes(sum(parts.values()))},
        "largest_module": format_bytes(max(sizes.values())),
        "distance_work": format_bytes(reserve),
        "passes_at_budget": {format_bytes(b): len(plan_groups(sizes, b - reserve)) for b in budgets},
    }


def table(rows: list[dict]) -> str:
    head = (
        "| case | n | modules | passes | forward s | TwoNN s | wall s | peak activations | distance work | peak RSS |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['n']} | {r['modules']} | {r['passes']} | {r['forward_s']} | {r['twonn_s']} | "
            f"{r['wall_s']} | {format_bytes(r['peak_activations'])} | {format_bytes(r['distance_reserve'])} | "
            f"{format_bytes(r['peak_rss'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--demo-n", type=int, default=2000, help="samples for the demo runs (default 2000)")
    p.add_argument("--base-n", type=int, default=32, help="samples for the BLIP-base run (default 32)")
    p.add_argument("--base-budget", default="3GB", help="--max-memory of the BLIP-base run (default 3GB)")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-base", action="store_true")
    p.add_argument("--json", default=None, help="also write everything to this JSON file")
    args = p.parse_args()

    report: dict = {"threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.skip_demo:
            rows += demo_runs(tmp, args.demo_n)
        if not args.skip_base:
            rows.append(base_run(tmp, args.base_n, args.base_budget))
    report["runs"] = rows
    report["distances"] = distance_rates()
    base = next((r for r in rows if r["case"].startswith("BLIP-base")), None)
    report["storage"] = storage(2000, [int(20e9), int(100e9), int(600e9)], text_tokens=40)
    if base is not None:
        n, big = base["n"], 2000
        shapes = base_shapes(40)
        width_sum = sum(w for _, _, w in shapes)
        d = report["distances"]
        report["extrapolation_n2000_base"] = {
            "forward_s_per_pass": round(base["forward_s"] / base["passes"] / n * big),
            "passes_at_budget": report["storage"]["passes_at_budget"],
            "gram_s": round(2 * big * big * width_sum / (d["gflops_fp64"] * 1e9)),
            "block_analysis_s": round(d["seed_block_analysis_s"] * len(shapes)),
            "sum_of_widths": width_sum,
        }
    report["load_avg_end"] = os.getloadavg()
    print(table(rows))
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
