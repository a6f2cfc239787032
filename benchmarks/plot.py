"""A task metric against compute for a set of runs of one task (dense and compressed), as a PNG.

    python -m benchmarks.plot --metric acc output/nlvr/results.json output/nlvr_p05/results.json --out fig.png

Each run's ``results.json`` (written by the entry scripts) gives the task, the pruner, the metrics
(``{split: {name: value}}``) and the cost of its model: ``flops`` (FlopCounterMode) and ``macs`` (the
seeds' convention, what their tables call FLOPs), per sample on the seeds' dummy inputs. Runs of one
pruner are joined by a line in order of cost; the dense run (pruner ``none``) is a star.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Point", "plot_runs", "read_run"]

_AXES = {"flops": "GFLOPs (FlopCounterMode)", "macs": 'GMACs (the seeds\' "FLOPs")'}


@dataclass
class Point:
    path: str
    task: str
    pruner: str
    label: str
    x: float  # G of the chosen cost
    y: float
    split: str


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a results object")
    return data


def _metric(data: dict[str, Any], path: Path, metric: str, split: str | None) -> tuple[float, str]:
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{path} has no 'metrics' ({{split: {{name: value}}}})")
    splits = [s for s, m in metrics.items() if isinstance(m, dict) and metric in m]
    if split is not None:
        if split not in metrics:
            raise ValueError(f"{path} has no split {split!r} in 'metrics'; it has {sorted(metrics)}")
        if metric not in metrics[split]:
            raise ValueError(f"{path}: split {split!r} has no metric {metric!r}; it has {sorted(metrics[split])}")
        return float(metrics[split][metric]), split
    if not splits:
        names = sorted({n for m in metrics.values() if isinstance(m, dict) for n in m})
        raise ValueError(f"{path} has no metric {metric!r} in any split; it has {names}")
    if len(splits) > 1 and "test" not in splits:
        raise ValueError(f"{path}: metric {metric!r} is in splits {splits}; choose one with --split")
    chosen = "test" if "test" in splits else splits[0]
    return float(metrics[chosen][metric]), chosen


def read_run(path: str | Path, metric: str, split: str | None = None, x: str = "flops") -> Point:
    """One run's point: ``x`` in G (``flops`` or ``macs`` from results.json) and the metric value.
    Without ``split``, the metric's only split, or ``test`` when it is in several."""
    path = Path(path)
    if x not in _AXES:
        raise ValueError(f"x must be one of {sorted(_AXES)}, got {x!r}")
    data = _load(path)
    cost = data.get(x)
    if not isinstance(cost, (int, float)):
        raise ValueError(
            f"{path} has no {x!r}: it was written without the measuring harness's cost. Measure its "
            f"checkpoint with `python -m benchmarks.measure --config ... --checkpoint ...` and add "
            f'"{x}" (per sample, as the harness reports it) to the file, or re-run with a cli.py that records it'
        )
    pruner = str(data.get("pruner", "none"))
    value, used = _metric(data, path, metric, split)
    return Point(
        path=str(path),
        task=str(data.get("task", "?")),
        pruner=pruner,
        label=f"{pruner} ({path.parent.name})",
        x=float(cost) / 1e9,
        y=value,
        split=used,
    )


def plot_runs(
    paths: Sequence[str | Path],
    metric: str,
    out: str | Path,
    split: str | None = None,
    x: str = "flops",
    title: str | None = None,
) -> list[Point]:
    """Plot ``metric`` against ``x`` for the runs in ``paths`` (all of one task) into the PNG ``out``;
    returns the points plotted, in the order given."""
    if not paths:
        raise ValueError("no results files given")
    points = [read_run(p, metric, split, x) for p in paths]
    tasks = sorted({p.task for p in points})
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks cannot share a plot: {tasks}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for pruner in dict.fromkeys(p.pruner for p in points):
        group = sorted((p for p in points if p.pruner == pruner), key=lambda p: p.x)
        dense = pruner == "none"
        ax.plot(
            [p.x for p in group],
            [p.y for p in group],
            marker="*" if dense else "o",
            markersize=12 if dense else 6,
            linestyle="none" if dense else "-",
            label="dense" if dense else pruner,
        )
    for p in points:
        ax.annotate(Path(p.path).parent.name, (p.x, p.y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(_AXES[x])
    ax.set_ylabel(f"{metric} ({', '.join(dict.fromkeys(p.split for p in points))})")
    ax.set_title(title or f"{tasks[0]}: {metric} against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return points


def main(argv: list[str] | None = None) -> list[Point]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description="Plot a task metric against FLOPs (or MACs) for runs of one task, from their results.json.",
    )
    p.add_argument("results", nargs="+", help="results.json files of the runs (dense and compressed)")
    p.add_argument("--metric", required=True, help="metric name inside results.json's metrics, e.g. acc, CIDEr")
    p.add_argument("--split", help="split to read the metric from (default: its only split, else test)")
    p.add_argument("--x", choices=sorted(_AXES), default="flops", help="cost on the x axis (default flops)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args(argv)
    try:
        points = plot_runs(args.results, args.metric, args.out, args.split, args.x, args.title)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    for pt in points:
        print(f"{pt.label}: {pt.x:.3f} G, {args.metric} ({pt.split}) {pt.y:g}")
    print(f"wrote {args.out}")
    return points


if __name__ == "__main__":
    main()
