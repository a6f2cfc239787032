"""The (task, backbone) table, and the config resolution every front end shares.

One entry per task and backbone names the task module that builds its data, model and task object and loads
its weights (``SCHEMA``, ``build_data``, ``build_model``, ``build_task``, ``load_pretrained``), its default and
demo configs and its entry script; the model it builds owns its cost probes (``model.cost_probe``). The entry
scripts, ``compute_id.py`` and ``benchmarks/`` read this table; nothing else names task modules.

A config picks its backbone with the ``backbone`` key (each task has a default); :func:`resolve` reads the
YAML, applies ``--set`` overrides and dedicated flags, validates against the entry's schema and fills in the
built-in paths (the synthetic world for ``--demo``, files shipped with the repository).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from config import ConfigError, check_values, load_config, load_yaml, parse_override
from engine import ENGINE_CHECKS, ENGINE_DEFAULTS

__all__ = ["COMMON_DEFAULTS", "ENTRIES", "Entry", "backbones", "lookup", "resolve", "schema", "tasks"]

REPO = Path(__file__).resolve().parents[1]

# Keys every task accepts besides the engine's.
COMMON_DEFAULTS: dict[str, Any] = {
    **ENGINE_DEFAULTS,
    "backbone": "",  # "" = the task's default backbone
    "pretrained": "",
    # The synthetic world of --demo; n_eval (None: n // 4) sizes its held-out splits without changing training.
    "world": {"dir": ".synthetic/world", "n": 600, "image_size": 64, "seed": 0, "n_eval": None},
    # results.json (and, for pruners, the dense model before pruning) records FLOPs/MACs on the seeds'
    # dummy inputs and the median latency of one batch-1 inference call on the run's device.
    "measure_cost": True,
    "measure_latency": True,
    # Module paths (e.g. visual_encoder) whose weights a dense run keeps fixed; a pruning run trains every
    # weight it keeps, as the seeds do, and ignores this.
    "freeze": [],
    # A compressed weights file without its architecture description is an error; true infers the widths from
    # the tensor shapes instead (the seeds' released *_compressed.pth files carry no description).
    "infer_arch": False,
}

# Config values naming files shipped with the repository, found from any working directory (dotted: nested).
_REPO_FILES = ("pretrained", "pruner_pretrained", "med_config", "tokenizer", "vit_init", "teacher.path")
_MODULE_API = ("SCHEMA", "build_data", "build_model", "build_task", "load_pretrained")


@dataclass(frozen=True)
class Entry:
    task: str
    backbone: str
    module: str  # the task module (tasks.<name>)
    default_config: str  # paths relative to the repository
    demo_config: str
    dataset: str  # data.create_dataset name of the task's splits (compute_id samples its training split)
    script: str  # the entry script

    def load(self) -> ModuleType:
        """The task module, checked for the functions every front end calls."""
        module = importlib.import_module(self.module)
        missing = [name for name in _MODULE_API if not hasattr(module, name)]
        if missing:
            raise TypeError(f"task module {self.module} lacks {missing}")
        return module


ENTRIES: tuple[Entry, ...] = (
    Entry("nlvr", "blip", "tasks.nlvr", "configs/nlvr.yaml", "configs/demo/nlvr.yaml", "nlvr", "compress_nlvr.py"),
    Entry(
        "caption",
        "blip",
        "tasks.caption",
        "configs/caption_coco.yaml",
        "configs/demo/caption.yaml",
        "caption_coco",
        "compress_caption.py",
    ),
    Entry("vqa", "blip", "tasks.vqa", "configs/vqa.yaml", "configs/demo/vqa.yaml", "vqa", "compress_vqa.py"),
    Entry(
        "retrieval",
        "blip",
        "tasks.retrieval",
        "configs/retrieval_coco.yaml",
        "configs/demo/retrieval.yaml",
        "retrieval",
        "compress_retrieval.py",
    ),
    Entry(
        "retrieval",
        "clip",
        "tasks.retrieval_clip",
        "configs/retrieval_coco_clip.yaml",
        "configs/demo/retrieval_clip.yaml",
        "retrieval",
        "compress_retrieval.py",
    ),
    Entry(
        "vqa", "vilt", "tasks.vilt_vqa", "configs/vilt_vqa.yaml", "configs/demo/vilt_vqa.yaml", "vqa", "compress_vqa.py"
    ),
    Entry(
        "nlvr",
        "vilt",
        "tasks.vilt_nlvr",
        "configs/vilt_nlvr.yaml",
        "configs/demo/vilt_nlvr.yaml",
        "nlvr",
        "compress_nlvr.py",
    ),
    Entry(
        "retrieval",
        "vilt",
        "tasks.vilt_retrieval",
        "configs/vilt_retrieval_coco.yaml",
        "configs/demo/vilt_retrieval.yaml",
        "retrieval",
        "compress_retrieval.py",
    ),
    Entry("ve", "vilt", "tasks.vilt_ve", "configs/vilt_ve.yaml", "configs/demo/vilt_ve.yaml", "ve", "compress_ve.py"),
    Entry(
        "classification",
        "vit",
        "tasks.classification",
        "configs/deit_imagenet.yaml",
        "configs/demo/classification.yaml",
        "imagenet",
        "compress_classification.py",
    ),
    Entry(
        "pretrain",
        "blip",
        "tasks.pretrain",
        "configs/demo/pretrain.yaml",
        "configs/demo/pretrain.yaml",
        "retrieval",
        "pretrain.py",
    ),
    Entry(
        "pretrain",
        "vilt",
        "tasks.vilt_pretrain",
        "configs/demo/vilt_pretrain.yaml",
        "configs/demo/vilt_pretrain.yaml",
        "retrieval",
        "pretrain.py",
    ),
    Entry(
        "text_assignment",
        "blip",
        "tasks.text_assignment",
        "configs/demo/text_assignment.yaml",
        "configs/demo/text_assignment.yaml",
        "text_assignment",
        "pretrain_nlvr.py",
    ),
)


def tasks() -> list[str]:
    return list(dict.fromkeys(e.task for e in ENTRIES))


def backbones(task: str) -> list[str]:
    """The backbones of ``task``, its default first."""
    found = [e.backbone for e in ENTRIES if e.task == task]
    if not found:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(tasks())}")
    return found


def lookup(task: str, backbone: str | None = None) -> Entry:
    """The entry of ``task`` on ``backbone`` (``None`` or "": the task's default)."""
    options = backbones(task)
    backbone = backbone or options[0]
    for e in ENTRIES:
        if e.task == task and e.backbone == backbone:
            return e
    raise ConfigError(f"task {task} has no backbone {backbone!r}; choose from {', '.join(options)}")


def schema(entry: Entry) -> dict[str, Any]:
    """Every key a config of ``entry`` accepts, with its default."""
    from pruners import PRUNER_DEFAULTS

    return {**COMMON_DEFAULTS, **PRUNER_DEFAULTS, **entry.load().SCHEMA, "backbone": entry.backbone}


def config_path(entry: Entry, path: str | Path | None, demo: bool, pruner: str = "none") -> Path:
    """The YAML to read: ``path``, else the entry's default, or with ``demo`` its demo config, or the demo config
    the pruner declares for this task (``Pruner.DEMO_CONFIGS``: ``--demo --pruner uvc`` on classification)."""
    if path is None and demo and pruner != "none":
        from pruners import PRUNERS

        cls = PRUNERS.get(pruner)
        path = cls.DEMO_CONFIGS.get(entry.task) if cls is not None else None
    path = Path(path or (entry.demo_config if demo else entry.default_config))
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    return path


def _backbone_of(path: Path, overrides: Iterable[str]) -> str:
    """The ``backbone`` a config asks for, read before the schema (which depends on it) is known."""
    chosen = ""
    if path.is_file():
        chosen = str(load_yaml(path).get("backbone") or "")
    for item in overrides:
        key, value = parse_override(item)
        if key == "backbone":
            chosen = str(value)
    return chosen


def resolve(
    task: str,
    path: str | Path | None,
    *,
    demo: bool = False,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    pruner: str = "none",
) -> tuple[Entry, dict[str, Any]]:
    """(entry, config) of ``task`` from the YAML ``path`` (default: the entry's default or demo config),
    ``--set`` ``overrides`` and dedicated ``flags`` (dotted key -> typed value, the most specific), checked
    against the entry's schema and the engine's ranges, then completed by the task module's ``complete_config``
    where it has one. ``config["_source"]`` names the file."""
    overrides = list(overrides)
    first = lookup(task)
    path = config_path(first, path, demo, pruner)
    entry = lookup(task, _backbone_of(path, overrides))
    if entry != first and path == config_path(first, None, demo, pruner):
        path = config_path(entry, None, demo, pruner)
    config = load_config(path, schema(entry), overrides, flags=flags)
    check_values(config, ENGINE_CHECKS, str(path))
    config["backbone"] = entry.backbone
    if demo:
        config = _substitute(config, "${world}", str(_absolute(config["world"]["dir"])))
    config["_source"] = str(path)
    for key in _REPO_FILES:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, str):
            node[leaf] = repo_file(value)
    complete = getattr(entry.load(), "complete_config", None)
    if complete is not None:  # a task's derived keys and cross-key checks (classification: the DeiT recipe)
        complete(config)
    return entry, config


def repo_file(value: str) -> str:
    """A relative path that does not exist from here but does under the repository (a shipped file), made absolute."""
    if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO / value).exists():
        return str(REPO / value)
    return value


def _absolute(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else (Path.cwd() / p)


def _substitute(obj: Any, key: str, value: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(key, value)
    if isinstance(obj, dict):
        return {k: _substitute(v, key, value) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, key, value) for v in obj]
    return obj
