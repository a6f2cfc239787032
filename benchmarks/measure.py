"""Measure one model, or two side by side: parameters, FLOPs, MACs, latency, throughput, peak memory.

    python -m benchmarks.measure --preset blip-nlvr --slice 0.5 --device cpu
    python -m benchmarks.measure --config configs/nlvr.yaml --checkpoint dense.pth --checkpoint small.pth
    python -m benchmarks.measure --config configs/demo/nlvr.yaml --demo --checkpoint ckpt.pth --eval-batches 4

The library functions (:func:`model_cost`, :func:`average_cost`, :func:`measure_latency`,
:func:`measure_throughput`, :func:`peak_memory`, :func:`compare`) are what entry scripts call; the
command line wraps :func:`compare`. Conventions:

* params: every ``named_parameters`` entry once (tied weights once). BLIP retrieval includes its
  momentum towers, as the seeds' published sizes do; the momentum share is reported separately.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, matrix products only) on
  the seed's dummy inputs and forward mode (the model's ``cost_probe("seed")``), per sample; the analytic
  cost model's figure for the same call (:mod:`models.cost`) beside it.
* MACs: the seeds' fvcore convention on the same call (1 per multiply-add, plus LayerNorm at 5 per
  element); these are the "FLOPs" of the UPop / MADTP / PuMer tables (:mod:`benchmarks.flops`).
* latency: median wall time of an inference call at batch 1 after warm-up; throughput: samples per
  second at a saturating batch (the smallest power of two after which doubling gains < 5 %, chosen
  on the first model and used for all). :func:`compare` times the models in alternation, call by
  call, so that a shared machine's changing load hits them alike. CUDA is synchronised around every
  timed call. Compare ratios from one run; absolute times mean little off a dedicated GPU.
* peak memory: see :mod:`benchmarks.memory`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.flops import count
from benchmarks.memory import peak_bytes
from benchmarks.presets import PRESETS, build_preset, uniform_slice
from models.cost import DynamicSchedule, Probe
from tasks import registry

__all__ = [
    "average_cost",
    "compare",
    "count_params",
    "markdown",
    "measure_latency",
    "measure_throughput",
    "model_cost",
    "peak_memory",
    "replayed_cost",
    "saturating_batch",
    "speed_cost",
]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients for the duration; the training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def preserved_state(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Put back every parameter and buffer afterwards (a counted training step moves momentum towers)."""
    if not active:
        yield
        return
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(saved[name])


def count_params(model: nn.Module) -> dict[str, int]:
    """``params``: all named parameters (each tensor once); ``momentum``: the part in momentum towers
    (the second module of each of ``model.model_pairs``, BLIP retrieval's convention)."""
    total = sum(p.numel() for p in model.parameters())
    momentum_ids = {id(p) for _, m in getattr(model, "model_pairs", []) for p in m.parameters()}
    momentum = sum(p.numel() for p in model.parameters() if id(p) in momentum_ids)
    return {"params": total, "momentum": momentum}


def _count_probe(model: nn.Module, probe: Probe, depth: int):
    with preserved_state(model, probe.mutates):
        _, cost = count(probe.run, model, depth)
    return cost


def _probe(model: nn.Module, kind: str, **kw: Any) -> Probe:
    probe = getattr(model, "cost_probe", None)
    if probe is None:
        raise TypeError(f"{type(model).__name__} has no cost probe (model.cost_probe) to measure it by")
    return probe(kind, **kw)


def model_cost(model: nn.Module, depth: int = 1) -> dict[str, Any]:
    """Parameters, FLOPs and MACs per sample on the seed's dummy inputs (one forward pass), and the analytic
    cost model's FLOPs and MACs for the same call (``flops_analytic``, ``macs_analytic``; seed convention).

    Works on any device, ``meta`` included (shapes only: fast and memory-free). The model's state
    is left as it was (retrieval's counted training step is undone). ``flops_by_module`` /
    ``macs_by_module`` split the totals over submodules down to ``depth``.
    """
    params = count_params(model)
    with inference(model):
        probe = _probe(model, "seed")
        cost = _count_probe(model, probe, depth)
        try:
            analytic = probe.analytic() if probe.analytic is not None else None
        except DynamicSchedule:  # a token schedule only a forward knows: the traced count stands alone
            analytic = None
    out = {
        "params": params["params"],
        "params_momentum": params["momentum"],
        "flops": cost.flops / probe.samples,
        "macs": cost.macs / probe.samples,
        "flops_by_module": {k: v / probe.samples for k, v in cost.flops_by_module.items()},
        "macs_by_module": {k: v / probe.samples for k, v in cost.macs_by_module.items()},
        "inputs": probe.inputs,
    }
    if analytic is not None:
        out["flops_analytic"] = analytic.flops / probe.samples
        out["macs_analytic"] = analytic.seed_macs / probe.samples
    return out


def average_cost(
    model: nn.Module, batches: Iterable[Any], dataset: Any = None, max_batches: int | None = None
) -> dict[str, Any]:
    """FLOPs and MACs per sample over real batches (from the task's evaluation loader), in the seed's
    forward mode (:func:`benchmarks.inputs.batch_probe`): the mean over all samples of the first
    ``max_batches`` batches. For costs that depend on the input, e.g. with token pruning."""
    flops = macs = 0.0
    samples = n_batches = 0
    inputs = ""
    with inference(model):
        for batch in itertools.islice(batches, max_batches):
            probe = _probe(model, "batch", batch=batch, dataset=dataset)
            cost = _count_probe(model, probe, depth=0)
            flops += cost.flops
            macs += cost.macs
            samples += probe.samples
            n_batches += 1
            inputs = inputs or probe.inputs
    if samples == 0:
        raise ValueError("no batches to average over (an empty loader, or max_batches=0)")
    return {
        "flops": flops / samples,
        "macs": macs / samples,
        "samples": samples,
        "batches": n_batches,
        "inputs": inputs,
    }


def replayed_cost(
    model: nn.Module, batches: Iterable[Any], dataset: Any = None, max_batches: int | None = None
) -> dict[str, Any]:
    """The analytic cost per sample of real batches in the seed's forward mode, each forward's token counts
    recorded and fed to the cost model (:func:`models.cost.recorded_counts`): what a dynamic token pruner
    (MADTP) removes. FLOPs and MACs (seed convention) are averaged over batches, each batch weighing the same (the
    seed's averaging); ``tokens`` gives every reducing block's mean token count after it (into its MLP)."""

    flops, macs, n_batches, tokens = 0.0, 0.0, 0, {}
    with inference(model):
        for batch in itertools.islice(batches, max_batches):
            probe = _probe(model, "batch", batch=batch, dataset=dataset)
            cost, counts = _replayed(model, probe)
            for name, calls in counts.items():
                tokens.setdefault(name, []).extend(c[2] for c in calls)
            flops += float(cost.flops) / probe.samples
            macs += float(cost.seed_macs) / probe.samples
            n_batches += 1
    if n_batches == 0:
        raise ValueError("no batches to average over (an empty loader, or max_batches=0)")
    dynamic = {k: round(sum(v) / len(v), 2) for k, v in tokens.items() if v and _reduces(model, k)}
    return {"flops": flops / n_batches, "macs": macs / n_batches, "batches": n_batches, "tokens": dynamic}


def _replayed(model: nn.Module, probe: Probe) -> tuple[Any, dict[str, list[tuple[int, int, int]]]]:
    """(analytic cost of one run of ``probe`` with the token counts it recorded, {block: counts of each call})."""
    from models.cost import recorded_counts, replayed_counts

    if probe.analytic is None:
        raise TypeError(f"{type(model).__name__}'s probe ({probe.inputs}) has no analytic cost")
    with preserved_state(model, probe.mutates), recorded_counts(model) as counts:
        probe.run()
    calls = counts.per_block()
    with replayed_counts(counts):
        return probe.analytic(), calls


def speed_cost(model: nn.Module, batch_size: int) -> dict[str, float]:
    """FLOPs and MACs per sample of the model's inference call (``cost_probe("speed")``) at ``batch_size``, from the
    analytic cost model with the call's own token counts: with a dynamic token pruner the counts are batch maxima,
    so the cost depends on the batch."""
    with inference(model):
        probe = _probe(model, "speed", batch_size=batch_size)
        cost, _ = _replayed(model, probe)
    return {"flops": float(cost.flops) / probe.samples, "macs": float(cost.seed_macs) / probe.samples}


def _reduces(model: nn.Module, block: str) -> bool:
    hooks = getattr(model.get_submodule(block), "token_hooks", None) or []
    return any(getattr(h, "out_tokens", True) is None for h in hooks)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure_latency(model: nn.Module, batch_size: int = 1, warmup: int = 3, repeats: int = 10) -> dict:
    """Median seconds of one inference call (the model's ``cost_probe("speed")``) at ``batch_size``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    with inference(model):
        probe = _probe(model, "speed", batch_size=batch_size)
        times = _timed(probe.run, _device(model), warmup, repeats)
    return {"batch": batch_size, "median_s": statistics.median(times), "times_s": times, "inputs": probe.inputs}


def measure_throughput(model: nn.Module, batch_size: int, warmup: int = 3, repeats: int = 10) -> dict:
    """Samples per second at ``batch_size`` (batch over the median call time)."""
    lat = measure_latency(model, batch_size, warmup, repeats)
    return {"batch": batch_size, "samples_per_s": batch_size / lat["median_s"], "median_s": lat["median_s"]}


def _interleaved(models: Mapping[str, nn.Module], batch_size: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Call times of every model's inference call, the models taking turns call by call, so that load
    changing on a shared machine affects all of them alike."""
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(inference(model))
        probes = {label: _probe(model, "speed", batch_size=batch_size) for label, model in models.items()}
        devices = {label: _device(model) for label, model in models.items()}
        for label, probe in probes.items():
            _timed(probe.run, devices[label], warmup, 0)
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(repeats):
            for label, probe in probes.items():
                times[label] += _timed(probe.run, devices[label], 0, 1)
    return times


def saturating_batch(model: nn.Module, max_batch: int, gain: float = 1.05, warmup: int = 1, repeats: int = 3) -> int:
    """The smallest power-of-two batch after which doubling raises throughput by less than ``gain``
    (or the largest that fits in memory, up to ``max_batch``)."""
    best_batch, best = 1, measure_throughput(model, 1, warmup, repeats)["samples_per_s"]
    batch = 2
    while batch <= max_batch:
        try:
            rate = measure_throughput(model, batch, warmup, repeats)["samples_per_s"]
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if rate < gain * best:
            break
        best_batch, best = batch, rate
        batch *= 2
    return best_batch


def peak_memory(model: nn.Module, batch_size: int = 1) -> dict:
    """Peak bytes during one inference call at ``batch_size`` (method in :mod:`benchmarks.memory`)."""
    with inference(model):
        probe = _probe(model, "speed", batch_size=batch_size)
        probe.run()  # first call allocates lazily built state; measure a steady call
        peak, method = peak_bytes(probe.run, model, _device(model))
    return {"batch": batch_size, "bytes": peak, "method": method}


# -------------------------------------------------------------------------------------------- report

_ROWS = [  # (key in a model's entry, label, scale, format)
    ("params", "params (M)", 1e-6, "{:.2f}"),
    ("params_momentum", "of which momentum towers (M)", 1e-6, "{:.2f}"),
    ("flops", "GFLOPs (FlopCounterMode, seed inputs)", 1e-9, "{:.3f}"),
    ("macs", "GMACs (seed convention: fvcore, seed inputs)", 1e-9, "{:.3f}"),
    ("eval_flops", "GFLOPs (mean over eval batches)", 1e-9, "{:.3f}"),
    ("eval_macs", "GMACs (mean over eval batches)", 1e-9, "{:.3f}"),
    ("latency_ms", "latency, batch 1 (ms)", 1.0, "{:.1f}"),
    ("throughput", "throughput (samples/s, batch {batch})", 1.0, "{:.2f}"),
    ("memory_1_mib", "peak memory, batch 1 (MiB)", 1.0, "{:.1f}"),
    ("memory_n_mib", "peak memory, batch {batch} (MiB)", 1.0, "{:.1f}"),
]


def compare(
    models: Mapping[str, nn.Module],
    task: str,
    *,
    speed: bool = True,
    batch_size: int | None = None,
    max_batch: int = 8,
    warmup: int = 3,
    repeats: int = 10,
    eval_loader: Any = None,
    eval_batches: int | None = None,
    depth: int = 1,
    sources: Mapping[str, str] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Measure every model in ``models`` (label -> model, in column order) for ``task``.

    ``sources`` says where each labelled model came from (a checkpoint path, a preset).
    Returns the report: per model its measurements, ``ratio`` (last model / first, per quantity),
    the inputs used and the conventions. ``speed=False`` skips latency, throughput and memory (the
    only measurements that need real tensors). ``eval_loader`` adds FLOPs / MACs averaged over its
    first ``eval_batches`` batches.
    """
    if not models:
        raise ValueError("no models to measure")
    entries: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"task": task, "sources": dict(sources or {}), "inputs": {}, "models": entries}
    for label, model in models.items():
        log(f"[{label}] counting parameters, FLOPs and MACs")
        cost = model_cost(model, depth)
        report["inputs"]["cost"] = cost.pop("inputs")
        entries[label] = cost
        if eval_loader is not None:
            log(f"[{label}] counting over {eval_batches or 'all'} evaluation batch(es)")
            avg = average_cost(model, eval_loader, getattr(eval_loader, "dataset", None), eval_batches)
            cost.update(eval_flops=avg["flops"], eval_macs=avg["macs"], eval_samples=avg["samples"])
            report["inputs"]["eval"] = avg["inputs"]

    if speed:
        first = next(iter(models.values()))
        device = _device(first)
        if batch_size is None:
            log(f"choosing a saturating batch (up to {max_batch}) on {next(iter(models))}")
            batch_size = saturating_batch(first, max_batch)
        report["inputs"]["speed"] = _probe(first, "speed").inputs
        report["device"] = str(device)
        report["threads"] = torch.get_num_threads()
        if device.type == "cuda":
            report["gpu"] = torch.cuda.get_device_name(device)
        log(f"latency (batch 1) and throughput (batch {batch_size}), models timed in alternation")
        lat = _interleaved(models, 1, warmup, repeats)
        thr = lat if batch_size == 1 else _interleaved(models, batch_size, warmup, repeats)
        for label, model in models.items():
            log(f"[{label}] peak memory")
            mem1 = peak_memory(model, 1)
            report["memory_method"] = mem1["method"]
            entries[label].update(
                latency_ms=1e3 * statistics.median(lat[label]),
                latency_times_s=lat[label],
                throughput=batch_size / statistics.median(thr[label]),
                throughput_batch=batch_size,
                memory_1_mib=mem1["bytes"] / 2**20,
            )
            if batch_size > 1:
                entries[label]["memory_n_mib"] = peak_memory(model, batch_size)["bytes"] / 2**20

    labels = list(entries)
    if len(labels) > 1:
        a, b = entries[labels[0]], entries[labels[-1]]
        report["ratio"] = {
            key: b[key] / a[key]
            for key, *_ in _ROWS
            if isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float)) and a[key]
        }
    report["torch"] = torch.__version__
    report["conventions"] = {
        "params": "all named_parameters, each tensor once; momentum towers included where the model has them",
        "flops": "torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add of matrix products and attention",
        "macs": "fvcore (the seeds): 1 per multiply-add of linear/matmul/bmm/einsum/conv, LayerNorm 5 per element",
        "latency": f"median of {repeats} calls after {warmup} warm-up calls",
    }
    return report


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown table: one column per model, then the ratio last / first."""
    labels = list(report["models"])
    ratio = report.get("ratio")
    batch = next((e.get("throughput_batch") for e in report["models"].values() if "throughput_batch" in e), None)
    header = ["quantity", *labels] + ([f"{labels[-1]} / {labels[0]}"] if ratio is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, scale, fmt in _ROWS:
        values = [report["models"][m].get(key) for m in labels]
        if all(v is None for v in values):
            continue
        if key == "params_momentum" and not any(values):
            continue
        cells = [fmt.format(v * scale) if isinstance(v, (int, float)) else "-" for v in values]
        if ratio is not None:
            cells.append(f"{ratio[key]:.3f}" if key in ratio else "-")
        lines.append("| " + " | ".join([label.format(batch=batch), *cells]) + " |")
    notes = [f"{label}: {source}" for label, source in report.get("sources", {}).items()]
    notes.append(f"task {report['task']}; cost inputs: {report['inputs'].get('cost', '-')}")
    if "eval" in report["inputs"]:
        samples = next(iter(report["models"].values())).get("eval_samples")
        notes.append(f"eval-batch costs: mean over {samples} samples; first batch: {report['inputs']['eval']}")
    if "speed" in report["inputs"]:
        notes.append(
            f"speed inputs (batch 1): {report['inputs']['speed']}; device {report.get('device')}"
            + (f" ({report['gpu']})" if "gpu" in report else f", {report.get('threads')} threads")
        )
        notes.append(f"memory: {report.get('memory_method')}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


# ---------------------------------------------------------------------------------------- command line


def _infer_task(config_path: str) -> str:
    stem = Path(config_path).stem
    for task in registry.tasks():
        if stem.startswith(task):
            return task
    if stem.startswith("deit"):
        return "classification"
    raise SystemExit(
        f"error: cannot tell the task from the config name {config_path!r}; pass --task ({', '.join(registry.tasks())})"
    )


def _config_from_file(args: argparse.Namespace, task: str) -> tuple[registry.Entry, dict[str, Any]]:
    """The entry and config exactly as the task's entry script resolves them (same schema, --set, --demo)."""
    from config import ConfigError

    try:
        entry, config = registry.resolve(task, args.config, demo=args.demo, overrides=args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.demo:
        from data.synthetic import ensure_demo_world

        ensure_demo_world(config["world"])
    if task == "classification" and config.get("num_classes") is None:
        config["num_classes"] = _classes_from_checkpoint(args.checkpoint)
    return entry, config


def _classes_from_checkpoint(paths: list[str]) -> int:
    import utils

    for path in paths:
        sd = utils.unwrap_state_dict(utils.load_checkpoint_file(path), path)
        if "head.weight" in sd:
            return int(sd["head.weight"].shape[0])
    raise SystemExit(
        "error: num_classes is not set in the config and no --checkpoint holds head.weight; pass --set num_classes=N"
    )


def _load(module: Any, model: nn.Module, path: str, config: Mapping[str, Any]) -> nn.Module:
    loaded = module.load_pretrained(model, path, config)
    # A loader may rebuild the model (a compressed checkpoint has other widths) and return it.
    return loaded if isinstance(loaded, nn.Module) else model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.measure",
        description=(
            "Measure a model (or two side by side, with the ratio second / first): parameters, FLOPs "
            "(FlopCounterMode), MACs in the seeds' fvcore convention on the seeds' dummy inputs, latency "
            "at batch 1, throughput at a saturating batch and peak memory."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Models come from --config (built as the task's entry script builds it, then each --checkpoint\n"
            "loaded by the task's load_pretrained; no --checkpoint: random weights) or from --preset (real\n"
            "sizes, random weights). A second column comes from a second --checkpoint or from --slice KEEP.\n"
            f"Presets: {', '.join(f'{k} ({v.task}, {v.note})' for k, v in PRESETS.items())}.\n"
            "Parameters include momentum towers (BLIP retrieval, as the seeds' tables do); their share is a row.\n"
            "Counting alone (--no-speed, no checkpoint, no --eval-batches) runs on the meta device: seconds,\n"
            "no memory. Outputs: the markdown table on stdout; --out DIR writes benchmark.json and benchmark.md."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="task YAML, as given to the task's entry script")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a real-size model with random weights")
    p.add_argument("--task", choices=registry.tasks(), help="task of --config (default: read from its file name)")
    p.add_argument("--demo", action="store_true", help="the config is a demo config: make the synthetic world")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="weights of the first column; given twice, the second is the second column",
    )
    p.add_argument(
        "--slice",
        type=float,
        metavar="KEEP",
        help="second column = the first with every head width and MLP width cut to KEEP (0-1] of it",
    )
    p.add_argument("--tokenizer", help="BLIP presets: a bert-base-uncased folder instead of the stand-in vocab")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-speed", action="store_true", help="count only: no latency, throughput or memory")
    p.add_argument("--batch", type=int, help="throughput batch (default: the saturating batch of the first model)")
    p.add_argument("--max-batch", type=int, help="largest batch tried for throughput (default 8 on CPU, 256 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported (default 10)")
    p.add_argument("--eval-batches", type=int, metavar="K", help="also average FLOPs/MACs over K eval batches")
    p.add_argument("--split", default="test", help="evaluation split for --eval-batches (default test)")
    p.add_argument("--depth", type=int, default=1, help="module depth of the per-module split in the JSON")
    p.add_argument("--out", type=Path, help="folder for benchmark.json and benchmark.md")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import utils

    args = build_parser().parse_args(argv)
    if len(args.checkpoint) > 2:
        raise SystemExit("error: at most two --checkpoint (first and second column)")
    if args.slice is not None and len(args.checkpoint) == 2:
        raise SystemExit("error: --slice makes the second column; do not also give a second --checkpoint")
    if args.slice is not None and not 0 < args.slice <= 1:
        raise SystemExit(f"error: --slice must be in (0, 1], got {args.slice}")
    device = utils.pick_device(args.device)
    real = not args.no_speed or bool(args.checkpoint) or bool(args.eval_batches)
    build_device = device if real else torch.device("meta")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731

    if args.preset:
        if args.eval_batches:
            raise SystemExit("error: --eval-batches needs --config (the evaluation data)")
        task, config, first = build_preset(args.preset, build_device, args.tokenizer)
        module = registry.lookup(task, PRESETS[args.preset].backbone).load()
        source = f"{args.preset} (random weights)"
    else:
        task = args.task or _infer_task(args.config)
        entry, config = _config_from_file(args, task)
        module = entry.load()
        with torch.device(build_device):
            first = module.build_model(config)
        source = f"{Path(args.config).name} (random weights)"
    if args.checkpoint:
        first = _load(module, first, args.checkpoint[0], config)
        source = args.checkpoint[0]
    models = {"A": first.to(build_device)}
    sources = {"A": source}
    if len(args.checkpoint) == 2:
        with torch.device(build_device):
            second = module.build_model(config)
        models["B"] = _load(module, second, args.checkpoint[1], config).to(build_device)
        sources["B"] = args.checkpoint[1]
    elif args.slice is not None:
        models["B"] = uniform_slice(copy.deepcopy(first), args.slice)
        sources["B"] = f"A with every head width and MLP width cut to {args.slice:g} of it (first entries kept)"

    loader = None
    if args.eval_batches:
        _, loaders = module.build_data(config, utils.DistInfo(device=device))
        if args.split not in loaders:
            raise SystemExit(
                f"error: task {task} has no evaluation split {args.split!r}; choose from {sorted(loaders)}"
            )
        loader = loaders[args.split]

    max_batch = args.max_batch or (256 if device.type == "cuda" else 8)
    report = compare(
        models,
        task,
        speed=not args.no_speed,
        batch_size=args.batch,
        max_batch=max_batch,
        warmup=args.warmup,
        repeats=args.repeats,
        eval_loader=loader,
        eval_batches=args.eval_batches,
        depth=args.depth,
        sources=sources,
        log=log,
    )
    report["command"] = "python -m benchmarks.measure " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(report)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "benchmark.md").write_text(table)
        log(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    main()
