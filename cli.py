"""What every entry script shares: flags, config, distributed setup, the run itself.

An entry script names its task and calls :func:`main`; the config's ``backbone`` key picks the row of the
(task, backbone) table in :mod:`tasks.registry`, whose task module builds data, model and task object. The
seeds' flags keep their names (``--config``, ``--pretrained``, ``--output_dir``, ``--evaluate``, ``--p``,
``--epoch``, ``--amp``); ``--set key=value`` patches any config key with type checking; ``--demo`` runs on
the built-in synthetic world.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import utils
from config import ConfigError
from engine import CHECKPOINT_LAST, Engine, EngineConfig
from losses import KDConfig
from tasks import registry
from utils import log

REPO = registry.REPO
EVAL_COST_BATCHES = 4  # evaluation batches a pruning run's eval_flops average over (dense and compressed)


def build_parser(task: str, description: str = "") -> argparse.ArgumentParser:
    from pruners import PRUNERS

    entry = registry.lookup(task)
    p = argparse.ArgumentParser(
        prog=entry.script,
        description=(description or task).strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Backbones: {', '.join(registry.backbones(task))} (the config's backbone key; the first is the default).\n"
            "Runs as plain `python` on one device (CPU included) or under "
            "`torchrun --nproc_per_node=N -- compress_<task>.py ...`\n"
            "(the `--` stops torchrun from reading --p as an abbreviation of its own flags).\n"
            "Every training run writes <output_dir>/config.yaml, log.jsonl (one line per epoch), "
            "checkpoint_last.pth (every epoch),\ncheckpoint_best.pth and results.json; an output_dir that "
            "holds a run is refused unless --resume or --overwrite.\n--evaluate writes "
            "eval_<checkpoint name>.json (numbered if it exists) and touches no run's files."
        ),
    )
    p.add_argument(
        "--config", default=None, help=f"task YAML (default {entry.default_config}; {entry.demo_config} with --demo)"
    )
    p.add_argument(
        "--demo", action="store_true", help="tiny model on the built-in synthetic world (generated on first use)"
    )
    p.add_argument(
        "--output_dir",
        default=None,
        help=f"where results go (default output/{task}, or output/PRUNER_{task} with --pruner; "
        "under output/demo/ with --demo)",
    )
    p.add_argument("--pretrained", default=None, help="weights to start from or to evaluate (overrides config)")
    p.add_argument(
        "--infer_arch",
        action="store_true",
        help="read a compressed model's widths from its tensor shapes when the file has no architecture "
        "description (the seeds' released *_compressed.pth files); without it such a file is an error",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate only, no training; writes eval_<checkpoint name>.json (never a run's results.json)",
    )
    p.add_argument("--resume", default=None, help="a checkpoint_last.pth to continue a run exactly")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output_dir that already holds a run: the earlier run's files are removed once "
        "the new run has written its first checkpoint, not before",
    )
    p.add_argument("--pruner", default="none", choices=sorted(PRUNERS), help="compression method")
    p.add_argument(
        "--p",
        type=float,
        default=None,
        help="the share to remove, in the pruner's terms: UPop its mask budget, PLATON the masked weights, "
        "EViT / ToMe / MADTP the FLOPs",
    )
    p.add_argument("--epoch", type=int, default=None, help="number of epochs (overrides max_epoch)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=None, help="random seed (each rank adds its rank)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, typed, repeatable (e.g. --set init_lr=1e-5 --set world.n=200)",
    )
    # Each pruner's own flags (the seeds' names), shortcuts for keys of its config section.
    for name, cls in sorted(PRUNERS.items()):
        if cls is None or not cls.FLAGS:
            continue
        group = p.add_argument_group(f"--pruner {name}")
        for flag, (key, kind, text) in cls.FLAGS.items():
            group.add_argument(
                flag,
                dest=_flag_dest(flag),
                type=kind,
                default=None,
                metavar=kind.__name__.upper(),
                help=f"{text} ({key})",
            )
    return p


def _flag_dest(flag: str) -> str:
    return "pruner_flag_" + flag.lstrip("-").replace("-", "_")


def _pruner_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Config keys of the pruner flags given on the command line (applied after --set: more specific)."""
    from pruners import PRUNERS

    items = {}
    for cls in PRUNERS.values():
        for flag, (key, _, _) in (cls.FLAGS if cls is not None else {}).items():
            value = getattr(args, _flag_dest(flag), None)
            if value is not None:
                items[key] = value
    return items


def resolve_config(task: str, args: argparse.Namespace) -> dict:
    """The run's config: the registry's resolution of the YAML, ``--set`` and the dedicated flags, then what a
    pruner changes (its dense starting point, its epochs, ``--p`` in its own terms)."""
    flags: dict[str, Any] = {}
    if args.pretrained is not None:
        flags["pretrained"] = args.pretrained
    if args.epoch is not None:
        flags["max_epoch"] = args.epoch
    if args.amp:
        flags["amp"] = True
    if args.seed is not None:
        flags["seed"] = args.seed
    if args.p is not None:
        flags["p"] = args.p
    if getattr(args, "infer_arch", False):
        flags["infer_arch"] = True
    pruner_flags = _pruner_flags(args)
    pruner = getattr(args, "pruner", "none")
    _, config = registry.resolve(
        task, args.config, demo=args.demo, overrides=args.overrides, flags={**flags, **pruner_flags}, pruner=pruner
    )
    _apply_p(config, pruner, pruner_flags)
    if pruner != "none":
        if args.pretrained is None and config["pruner_pretrained"]:
            # Pruners start from the task-fine-tuned dense model, not from the pre-trained one.
            config["pretrained"] = config["pruner_pretrained"]
        teacher = (config.get(pruner) or {}).get("teacher")
        if teacher and not config["teacher"]["path"]:  # the pruner's own teacher (PuMer: the fine-tuned dense model)
            config["teacher"]["path"] = registry.repo_file(teacher)
        epochs = (config.get(pruner) or {}).get("epochs")
        if args.epoch is None and epochs:  # the pruner's own epoch count (--epoch still wins)
            config["max_epoch"] = epochs
    return config


def _apply_p(config: dict, pruner: str, pruner_flags: Mapping[str, Any]) -> None:
    """``p`` in the terms of a pruner whose own option says it another way (PLATON: final_threshold = 1 - p);
    it beats the config file, and a flag for the same option must agree."""
    from pruners import PRUNERS

    cls = PRUNERS.get(pruner)
    if cls is None or config["p"] is None:
        return
    try:
        implied = cls.options_from_p(float(config["p"]))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, value in implied.items():
        given = pruner_flags.get(f"{pruner}.{key}")
        if given is not None and abs(float(given) - value) > 1e-9:
            flag = next(f for f, (k, _, _) in cls.FLAGS.items() if k == f"{pruner}.{key}")
            raise ConfigError(
                f"--p {config['p']} means {pruner}.{key} = {value:g}, but {flag} gives {given}; give one of them"
            )
        config[pruner][key] = value


def _check_output_dir(output_dir: Path, args: argparse.Namespace) -> None:
    """Refuse to silently start over on top of an earlier run's checkpoints (demos included); an evaluation
    writes a file of its own and may go anywhere."""
    last = output_dir / CHECKPOINT_LAST
    if last.exists() and not (args.resume or args.evaluate or args.overwrite):
        raise SystemExit(
            f"error: {output_dir} already holds a run ({last.name}); pass --resume {last} to continue it, "
            "--overwrite to start over (the earlier run's files go once the new run has a checkpoint), "
            "or another --output_dir"
        )


def evaluation_file(output_dir: Path, checkpoint: str, overwrite: bool = False) -> Path:
    """``<output_dir>/eval_<checkpoint name>.json``; an existing one is kept and a numbered name chosen
    (``eval_<name>.2.json``, ...) unless ``overwrite``."""
    name = Path(checkpoint).name
    for suffix in (".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
        name = name.removesuffix(suffix)
    base = "eval_" + (re.sub(r"[^\w.-]+", "_", name) or "weights")
    path, k = output_dir / f"{base}.json", 2
    while path.exists() and not overwrite:
        path, k = output_dir / f"{base}.{k}.json", k + 1
    return path


def default_output_dir(task: str, args: argparse.Namespace, backbone: str | None = None) -> str:
    """output/<task>, or output/<pruner>_<task> for a pruning run (so it never lands in the dense run's folder);
    ``_<backbone>`` appended for any backbone but the task's first (output/retrieval_clip); under output/demo/ with
    --demo."""
    pruner = getattr(args, "pruner", "none")
    name = task if pruner == "none" else f"{pruner}_{task}"
    if backbone and backbone != registry.lookup(task).backbone:
        name += f"_{backbone}"
    return f"output/demo/{name}" if args.demo else f"output/{name}"


def main(task: str, description: str = "", argv: list[str] | None = None) -> dict:
    """Parse, check everything that can be checked without data or weights (config keys and values, the
    pruner's options, the output folder), then run ``task``."""
    from pruners import build_pruner

    args = build_parser(task, description).parse_args(argv)
    if args.epoch is not None and args.epoch < 1:
        raise SystemExit(f"error: --epoch must be at least 1, got {args.epoch}")
    if args.p is not None and args.pruner == "none":
        raise SystemExit("error: --p is a pruner's ratio and does nothing without --pruner NAME")
    try:
        config = resolve_config(task, args)
        entry = registry.lookup(task, config["backbone"])
        module = entry.load()
        pruner = build_pruner(args.pruner, config)
        kd = KDConfig.from_config(config["teacher"])
        if kd.active and not Path(kd.path).is_file():
            raise FileNotFoundError(f"teacher.path: teacher weights {kd.path} do not exist")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.evaluate and not config["pretrained"]:
        raise SystemExit("error: --evaluate needs weights to evaluate: give --pretrained (or pretrained in the config)")
    output_dir = Path(args.output_dir or default_output_dir(task, args, config["backbone"]))
    _check_output_dir(output_dir, args)

    dist_info = utils.init_distributed(args.device)
    try:
        return _run(entry, module, args, config, pruner, kd, output_dir, dist_info)
    finally:
        utils.cleanup_distributed()


def _run(entry, module, args, config: dict, pruner, kd, output_dir: Path, dist_info: utils.DistInfo) -> dict:
    utils.setup_logging(output_dir)
    if utils.is_main_process():
        for stale in utils.remove_stale_temporaries(output_dir):
            log.info("removed %s, a file half-written by an earlier run that was stopped", stale)
    results_file = output_dir / "results.json"
    if args.evaluate:  # agreed by all ranks: rank 0 looks at the folder
        results_file = utils.broadcast_object(evaluation_file(output_dir, config["pretrained"], args.overwrite))
    config["_output_dir"] = str(output_dir)
    config["_result_dir"] = str(output_dir / "result" / (results_file.stem if args.evaluate else ""))
    utils.set_seed(config["seed"] + dist_info.rank)
    if args.demo:
        from data.synthetic import ensure_demo_world

        if utils.is_main_process():
            ensure_demo_world(config["world"])
        utils.barrier()
    log.info(
        "task %s (%s), pruner %s, %d process(es) on %s, config %s",
        entry.task,
        entry.backbone,
        args.pruner,
        dist_info.world_size,
        dist_info.device,
        config["_source"],
    )

    t0 = time.time()
    train_loader, eval_loaders = module.build_data(config, dist_info)
    model = module.build_model(config)
    if config["pretrained"]:
        module.load_pretrained(model, config["pretrained"], config, evaluate=args.evaluate)
    task = module.build_task(config, train_loader)
    teacher = None
    if kd.active and not args.evaluate:  # a frozen model at the dense widths, every weight from its file
        teacher = module.build_model(config)
        module.load_pretrained(teacher, kd.path, config, evaluate=True)
        log.info("distilling from %s (%s, alpha %g, tau %g)", kd.path, kd.kind, kd.alpha, kd.tau)
    if config["freeze"] and pruner is None:
        n = utils.freeze_parameters(model, config["freeze"])
        log.info("froze %d parameter tensors under %s", n, ", ".join(config["freeze"]))
    elif config["freeze"]:
        log.info("freeze %s is for dense runs; the %s run trains every weight it keeps", config["freeze"], args.pruner)
    dense_cost = {}
    first_split = next(iter(eval_loaders.values()), None) if pruner is not None else None
    if pruner is not None:
        if not (args.evaluate or args.resume):  # the model the pruner starts from, before masks or hooks
            dense_cost = _model_cost(model.to(dist_info.device), config, first_split)
        pruner.attach(model)
    engine = Engine(
        model,
        task,
        EngineConfig.from_config(config),
        dist_info,
        output_dir,
        pruner=pruner,
        config={k: v for k, v in config.items() if not k.startswith("_")},
        dense_cost=dense_cost,
        teacher=teacher,
        kd=kd,
    )
    if args.evaluate:
        metrics = engine.evaluate(eval_loaders)
        results = {
            "metrics": metrics,
            "params": utils.count_parameters(model),
            "checkpoint": config["pretrained"],
        }
        if pruner is not None:  # e.g. the measured sparsity of a pruned checkpoint
            results["pruner_report"] = pruner.report()
    else:
        results = engine.fit(train_loader, eval_loaders, resume=args.resume)
        if pruner is not None and pruner.exports_model:
            results["compressed_checkpoint"] = _export_compressed(Path(results["checkpoint"]), output_dir, engine)
    results = {
        "task": entry.task,
        "backbone": entry.backbone,
        "pruner": args.pruner,
        **results,
        **_model_cost(engine.model, config, first_split),  # the model the run ended with (compressed in place)
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
        "output_dir": str(output_dir),
        "config": config["_source"],
        "command": " ".join(sys.argv),
        "time_s": round(time.time() - t0, 2),
    }
    if args.evaluate:  # a training run writes config.yaml; an evaluation keeps its config in its own file
        results["config_values"] = engine.config
    utils.write_json(results_file, results)
    log.info("results: %s (%s)", results["metrics"], results_file)
    if results.get("dense"):
        log.info("%s", _comparison(results))
    return results


def _model_cost(model: torch.nn.Module, config: Mapping[str, Any], eval_loader: Any = None) -> dict[str, Any]:
    """FLOPs / MACs per sample on the seeds' dummy inputs (traced, and from the analytic cost model), with an
    ``eval_loader`` also averaged over its first batches (``eval_flops``: real inputs, what token pruning acts on),
    and the batch-1 latency of ``model``.

    Every rank runs it: retrieval's counted training step gathers across ranks.
    """
    from benchmarks.measure import average_cost, measure_latency, model_cost

    if getattr(model, "cost_probe", None) is None or not config["measure_cost"]:  # pre-training has no convention
        return {}
    cost = model_cost(model)
    keys = ("flops", "macs", "flops_analytic", "macs_analytic", "params_momentum")
    out = {k: cost[k] for k in keys if k in cost} | {"cost_inputs": cost["inputs"]}
    if eval_loader is not None:
        avg = average_cost(model, eval_loader, getattr(eval_loader, "dataset", None), max_batches=EVAL_COST_BATCHES)
        out |= {"eval_flops": avg["flops"], "eval_macs": avg["macs"], "eval_cost_samples": avg["samples"]}
    if config["measure_latency"]:
        out["latency_ms"] = 1000 * measure_latency(model, batch_size=1)["median_s"]
    return out


def _export_compressed(best: Path, output_dir: Path, engine: Engine) -> str:
    """The best compressed model as ``model_compressed.safetensors`` + ``.json`` (+ ``.pth``); a run with no best
    epoch (none reached the pruner's target) exports its last one, described as the model is now."""
    from models.arch import read_weights, save_compressed

    stem = output_dir / "model_compressed"
    if utils.is_main_process():
        sd, arch = read_weights(best)
        arch = arch if arch is not None else engine.architecture()
        save_compressed(stem, sd, arch)
    utils.barrier()
    return str(stem.with_suffix(".safetensors"))


def _comparison(results: Mapping[str, Any]) -> str:
    """Dense against pruned, one line per quantity, for the end of a pruning run."""
    dense, rows = results["dense"], []
    for split, metrics in results["metrics"].items():
        for key, value in metrics.items():
            before = dense.get("metrics", {}).get(split, {}).get(key)
            if isinstance(value, float) and isinstance(before, float):
                rows.append(f"  {split} {key}: dense {before:.4g} -> pruned {value:.4g} ({value - before:+.4g})")
    for key in ("params", "flops", "macs", "eval_flops", "latency_ms"):
        if key in dense and key in results:
            a, b = dense[key], results[key]
            rows.append(f"  {key}: dense {a:.4g} -> pruned {b:.4g} (x{b / a:.3f})" if a else f"  {key}: {a} -> {b}")
    return "dense vs pruned:\n" + "\n".join(rows)
