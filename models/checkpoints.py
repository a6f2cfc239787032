"""Loading released checkpoints: the official BLIP task files and the UPop/MADTP files sharing their keys.

Our BLIP models keep the official parameter names, so nothing is renamed. The loader's job is
policy instead: which keys a file may carry that the model lacks and the other way round, the
position-embedding grid, NLVR2's twin cross-attention when starting from a pretrained file, the tied
LM head, and the momentum towers. BLIP's own loader silently drops every key whose shape differs
from the model's; here anything the policy does not explain is a :class:`utils.CheckpointError` that
names the file and the keys. Shapes always come from the model, never from base-size assumptions, so
compressed checkpoints load into a model built at their widths.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from utils import CheckpointError, load_checkpoint_file, log, unwrap_state_dict

from .vit import resample_pos_embed

__all__ = [
    "BLIP_FAMILIES",
    "BLIP_TASKS",
    "LoadReport",
    "copy_momentum_params",
    "detect_blip_task",
    "load_blip_checkpoint",
]

BLIP_TASKS = ("retrieval", "nlvr", "vqa", "caption", "pretrain")

_CONTRASTIVE = frozenset(
    {
        "visual_encoder",
        "text_encoder",
        "vision_proj",
        "text_proj",
        "itm_head",
        "visual_encoder_m",
        "vision_proj_m",
        "text_encoder_m",
        "text_proj_m",
        "temp",
        "image_queue",
        "text_queue",
    }
)

# Top-level names (first key component) each official task model holds.
BLIP_FAMILIES: dict[str, frozenset[str]] = {
    "retrieval": _CONTRASTIVE | {"idx_queue", "ptr_queue"},
    "nlvr": frozenset({"visual_encoder", "text_encoder", "cls_head"}),
    "vqa": frozenset({"visual_encoder", "text_encoder", "text_decoder"}),
    "caption": frozenset({"visual_encoder", "text_decoder"}),
    "pretrain": _CONTRASTIVE | {"queue_ptr", "text_decoder"},
}

_QUEUE_BUFFERS = frozenset({"image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr"})
_POS_EMBEDS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
_LM_HEAD = "text_decoder.cls.predictions."
# (alias, source): the released files store both names for one tensor.
_TIED = (
    (f"{_LM_HEAD}decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"),
    (f"{_LM_HEAD}decoder.bias", f"{_LM_HEAD}bias"),
)
_ALWAYS_UNEXPECTED = ("*.embeddings.position_ids",)  # HF 4.15 saved it; our models derive positions
# Modules a task model initialises itself when fine-tuning starts from a pretrained file.
_FRESH_FROM_PRETRAINED = {
    "retrieval": ("idx_queue", "ptr_queue"),  # the pretrained file has `queue_ptr` and no image ids
    "nlvr": ("*.crossattention.output.merge_layer.*", "cls_head.*"),
}
_CROSS_SELF = re.compile(r"^(.*\.crossattention\.)self\.(.*)$")
_CROSS_DENSE = re.compile(r"^(.*\.crossattention\.output\.)dense\.(weight|bias)$")


@dataclass
class LoadReport:
    """What a checkpoint load did beyond copying tensors by name; callers log :meth:`summary`."""

    source: str
    task: str
    detected_task: str
    missing: list[str] = field(default_factory=list)  # model keys left at their initial values
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys ignored
    resampled: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (rows in file, rows now)
    duplicated: list[str] = field(default_factory=list)  # NLVR2 twin keys made from single-branch ones
    tied: list[str] = field(default_factory=list)  # aliases checked equal and loaded through their source
    momentum_reset: list[str] = field(default_factory=list)  # momentum modules re-copied from online ones

    def summary(self) -> str:
        parts = [f"loaded BLIP {self.detected_task} checkpoint {self.source} into the {self.task} model"]
        for key, (old, new) in self.resampled.items():
            parts.append(f"resampled {key} from {old} to {new} positions")
        if self.duplicated:
            parts.append(f"{len(self.duplicated)} twin cross-attention keys copied from single-branch keys")
        if self.tied:
            parts.append(f"tied {', '.join(self.tied)}")
        if self.missing:
            parts.append(f"{len(self.missing)} keys left initialised: {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint keys ignored: {_preview(self.unexpected)}")
        if self.momentum_reset:
            parts.append(f"momentum reset from online weights: {', '.join(self.momentum_reset)}")
        return "; ".join(parts)


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys)} in all)"


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _family(key: str) -> str:
    return key.split(".", 1)[0]


def _strip_module(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    if keys and all(k.startswith("module.") for k in keys):
        return [k[len("module.") :] for k in keys]
    return keys


def detect_blip_task(state_dict: Mapping[str, Any], source: str = "the state dict") -> str:
    """Which official BLIP model a state dict belongs to, from its key families (one of BLIP_TASKS).

    Accepts a ``module.``-prefixed dict; raises :class:`CheckpointError` for anything else.
    """
    keys = _strip_module(state_dict)
    families = {_family(k) for k in keys}
    if "visual_encoder" not in families:
        found = ", ".join(sorted(families)) or "no keys"
        raise CheckpointError(f"{source} does not look like a BLIP checkpoint (no visual_encoder.*; found {found})")
    if "cls_head" in families or any(".crossattention.self0." in k for k in keys):
        return "nlvr"
    if "text_decoder" in families:
        if families & {"queue_ptr", "itm_head", "text_encoder_m", "visual_encoder_m"}:
            return "pretrain"
        return "vqa" if "text_encoder" in families else "caption"
    if families & {"itm_head", "vision_proj", "text_proj", "text_encoder_m"}:
        return "retrieval"
    raise CheckpointError(
        f"{source} does not look like any BLIP task checkpoint (families: {', '.join(sorted(families))})"
    )


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())


def _resample_pos_embeds(
    sd: dict[str, Tensor], shapes: Mapping[str, torch.Size], source: str, report: LoadReport
) -> None:
    for key in _POS_EMBEDS:
        if key not in sd or key not in shapes:
            continue
        old, new = sd[key].shape, shapes[key]
        # A different width is a shape mismatch for the key check to report, not a grid change.
        if old == new or len(old) != 3 or len(new) != 3 or old[-1] != new[-1]:
            continue
        side = math.isqrt(new[1] - 1)
        if side * side != new[1] - 1:
            raise CheckpointError(f"cannot resample {key} of {source}: the model's {new[1] - 1} patches are not square")
        try:
            sd[key] = resample_pos_embed(sd[key], side)
        except ValueError as e:
            raise CheckpointError(f"cannot resample {key} of {source}: {e}") from e
        report.resampled[key] = (old[1], new[1])
        log.info("%s: resampled %s from %d to %d positions", source, key, old[1], new[1])


def _split_cross_attention(sd: dict[str, Tensor], shapes: Mapping[str, torch.Size], report: LoadReport) -> None:
    """Seed NLVR2's two cross-attention branches from the single branch of a pretrained file."""
    for key in list(sd):
        for pattern, name in ((_CROSS_SELF, "self"), (_CROSS_DENSE, "dense")):
            m = pattern.match(key)
            if m is None:
                continue
            twins = [f"{m.group(1)}{name}{i}.{m.group(2)}" for i in (0, 1)]
            if all(t in shapes for t in twins):
                value = sd.pop(key)
                for t in twins:
                    sd[t] = value
                report.duplicated += twins


def _resolve_tied(sd: dict[str, Tensor], target: Mapping[str, Tensor], source: str, report: LoadReport) -> set[str]:
    """Check the file's tied pairs agree and route each through its source key; returns model keys
    that are filled by that (aliases the model ties to their source)."""
    covered: set[str] = set()
    for alias, src in _TIED:
        if alias in sd:
            if src in sd:
                a, b = sd[alias], sd[src]
                if a.shape != b.shape or not torch.equal(a, b):
                    raise CheckpointError(
                        f"{source}: {alias} differs from {src}; the LM head must be tied to them "
                        f"(shapes {tuple(a.shape)} and {tuple(b.shape)})"
                    )
                del sd[alias]
            else:
                # Writers that de-duplicate shared tensors (safetensors) may keep either name.
                sd[src] = sd.pop(alias)
            report.tied.append(alias)
        if src not in sd or alias not in target:
            continue
        if src in target and _same_tensor(target[alias], target[src]):
            covered.add(alias)
        else:
            sd[alias] = sd[src]  # a model that keeps the head untied gets its own copy
    return covered


def _allowed_missing(task: str, detected: str, extra: Iterable[str], sd: Mapping[str, Any]) -> list[str]:
    patterns = list(extra)
    if detected == "pretrain" and task != "pretrain":
        patterns += _FRESH_FROM_PRETRAINED.get(task, ())
    if task == "nlvr" and detected == "nlvr" and not any(k.startswith("cls_head.") for k in sd):
        # A two-image pre-trained file (text assignment, exported without its 3-way head): no classifier
        # to load, so the model keeps its fresh one.
        patterns.append("cls_head.*")
    return patterns


def _unexpected_ok(key: str, task: str, detected: str, extra: Sequence[str]) -> bool:
    if _matches(key, _ALWAYS_UNEXPECTED) or key in _QUEUE_BUFFERS or _matches(key, extra):
        return True
    # A pretrained file carries every tower; a task model fine-tuned from it uses some.
    return detected == "pretrain" and task != "pretrain" and _family(key) not in BLIP_FAMILIES[task]


def load_blip_checkpoint(
    model: nn.Module,
    path_or_sd: str | Path | Mapping[str, Any],
    task: str,
    *,
    reset_momentum: bool = False,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    source: str | None = None,
    evaluate: bool = False,
) -> LoadReport:
    """Load an official (or same-layout) BLIP checkpoint into our ``task`` model.

    ``path_or_sd`` is a file (``.pth`` pickle read with ``weights_only=True``, or safetensors) or an
    in-memory dict, either bare or under ``'model'``, with or without a DDP ``module.`` prefix. The file
    must be a ``task`` checkpoint or a pretrained one (from which every task fine-tunes). The ViT
    position embeddings are resampled to the model's grid; from a pretrained file an NLVR2 model gets
    both cross-attention branches from the single one and keeps its fresh ``merge_layer`` and
    ``cls_head``. ``reset_momentum`` re-copies online weights into every ``<name>_m`` module
    afterwards (UPop); otherwise the file's momentum towers are kept (BLIP).

    Keys the model has and the file lacks, or the other way round, are errors unless allowed:
    ``*.embeddings.position_ids``, queue buffers the model lacks, towers of a pretrained file the task
    does not use, and from a pretrained file the retrieval ``idx_queue``/``ptr_queue`` and the NLVR2
    ``merge_layer``/``cls_head``, and the NLVR2 ``cls_head`` of a twin file that has none (text-assignment
    pre-training); plus the glob patterns ``allow_missing``/``allow_unexpected``
    (method extras such as mask parameters). ``strict=False`` downgrades the remaining
    missing/unexpected keys to a warning; a shape mismatch or a checkpoint of another task is always
    an error. ``evaluate`` (weights about to be evaluated, not fine-tuned) refuses a file that leaves any
    model parameter at its initial value (e.g. an NLVR2 file without ``cls_head``), naming the keys; buffers
    that evaluation never reads (the queues) may still be missing.
    """
    if task not in BLIP_TASKS:
        raise ValueError(f"unknown BLIP task {task!r}; choose from {BLIP_TASKS}")
    if isinstance(path_or_sd, Mapping):
        name = source or "the in-memory state dict"
        sd = unwrap_state_dict(path_or_sd, name)
    else:
        name = source or str(path_or_sd)
        sd = unwrap_state_dict(load_checkpoint_file(path_or_sd), name)

    detected = detect_blip_task(sd, name)
    if detected not in (task, "pretrain"):
        raise CheckpointError(f"{name} looks like a BLIP {detected} checkpoint, but the model is {task}")
    report = LoadReport(source=name, task=task, detected_task=detected)

    target = model.state_dict(keep_vars=True)
    shapes = {k: v.shape for k, v in target.items()}
    _resample_pos_embeds(sd, shapes, name, report)
    if task == "nlvr" and detected != "nlvr":
        _split_cross_attention(sd, shapes, report)
    covered = _resolve_tied(sd, target, name, report)

    missing_ok = _allowed_missing(task, detected, allow_missing, sd)
    unexpected_extra = list(allow_unexpected)
    missing = [k for k in target if k not in sd and k not in covered]
    unexpected = [k for k in sd if k not in target]
    bad_missing = [k for k in missing if not _matches(k, missing_ok)]
    bad_unexpected = [k for k in unexpected if not _unexpected_ok(k, task, detected, unexpected_extra)]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(shapes[k])})"
        for k, v in sd.items()
        if k in shapes and v.shape != shapes[k]
    ]

    if evaluate:
        params = {k for k, _ in model.named_parameters()}
        untrained = [k for k in missing if k in params and k not in covered]
        if untrained:
            raise CheckpointError(
                f"cannot evaluate {name} as a BLIP {task} model: it lacks {len(untrained)} of the model's weights "
                f"({_preview(untrained)}), which would be evaluated at their random initial values; "
                f"give a checkpoint fine-tuned for {task}"
            )
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_preview(mismatched)}")
    if bad_missing and strict:
        problems.append(f"{len(bad_missing)} model keys missing from the checkpoint: {_preview(bad_missing)}")
    if bad_unexpected and strict:
        problems.append(f"{len(bad_unexpected)} checkpoint keys the model does not have: {_preview(bad_unexpected)}")
    if problems:
        raise CheckpointError(f"cannot load {name} into the BLIP {task} model: " + "; ".join(problems))
    if bad_missing or bad_unexpected:
        log.warning(
            "%s (non-strict): %d keys missing (%s), %d unexpected (%s)",
            name,
            len(bad_missing),
            _preview(bad_missing),
            len(bad_unexpected),
            _preview(bad_unexpected),
        )

    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    report.missing, report.unexpected = missing, unexpected
    if reset_momentum:
        report.momentum_reset = copy_momentum_params(model)
    log.info("%s", report.summary())
    return report


def copy_momentum_params(model: nn.Module) -> list[str]:
    """Copy every online module's parameters into its ``<name>_m`` momentum twin; returns the twins.

    Twins must have the same parameter names and shapes (compress both towers alike before calling).
    """
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    for name in modules:
        if name.endswith("_m") and name[:-2] in modules and not any(name.startswith(m + ".") for _, m in pairs):
            pairs.append((name[:-2], name))
    with torch.no_grad():
        for online_name, momentum_name in pairs:
            online = dict(modules[online_name].named_parameters())
            momentum = dict(modules[momentum_name].named_parameters())
            if online.keys() != momentum.keys():
                diff = sorted(online.keys() ^ momentum.keys())
                raise ValueError(f"{online_name} and {momentum_name} differ in parameters: {_preview(diff)}")
            for key, p in online.items():
                if momentum[key].shape != p.shape:
                    raise ValueError(
                        f"{momentum_name}.{key} has shape {tuple(momentum[key].shape)} but "
                        f"{online_name}.{key} has {tuple(p.shape)}"
                    )
                momentum[key].copy_(p)
    return [m for _, m in pairs]


def load_vit_weights(vit: nn.Module, path: str | Path, source: str | None = None) -> list[str]:
    """Initialise a ViT from a classification checkpoint (timm/DeiT layout, or this project's ``compress_
    classification.py`` output), as BLIP's pre-training starts from an ImageNet ViT.

    The classifier head is dropped and ``pos_embed`` resampled to the model's grid; every other key must
    match exactly. Returns the dropped keys.
    """
    name = source or str(path)
    sd = unwrap_state_dict(load_checkpoint_file(path), name)
    dropped = [k for k in sd if k.startswith(("head.", "head_dist.", "fc_norm."))]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    target = vit.state_dict()
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        side = math.isqrt(target["pos_embed"].shape[1] - 1)
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], side)
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    mismatched = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{name} does not fit the ViT: missing {_preview(missing)}, unexpected {_preview(unexpected)}, "
            f"shape mismatch {_preview(mismatched)}"
        )
    vit.load_state_dict(sd)
    log.info("initialised the ViT from %s (dropped %s)", name, ", ".join(dropped) or "nothing")
    return dropped
