"""What the token pruners (EViT, ToMe) share: finding the encoders of a task model, and turning ``--p`` (the share
of FLOPs to remove) into a reducer setting with the analytic cost model.

A token pruner never knows the task: it reaches the image encoders (every :class:`~models.vit.VisionTransformer`
in the model, momentum towers included, or the model itself for a classifier) and the text encoders (every MED
``BertModel`` that is not a decoder) through the modules' types, and costs a setting through the model's own
cost probe (``model.cost_probe("seed").analytic``), which reads the reducers' token schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from models.cost import Probe

__all__ = ["analytic_flops", "image_tokens", "solve", "text_encoders", "vision_encoders"]


def vision_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, ViT) of every image encoder of ``model`` ("" for a classifier that is a ViT itself)."""
    from models.vit import VisionTransformer

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, VisionTransformer)]
    if not found:
        raise TypeError(f"{type(model).__name__} has no vision transformer to reduce tokens in")
    return found


def text_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, BertModel) of every bidirectional text encoder of ``model`` (decoders are left out: they decode
    with a key/value cache, which cannot lose tokens)."""
    from models.med import BertModel

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, BertModel) and not name.split(".")[0].startswith("text_decoder")
    ]


def _seed_probe(model: nn.Module) -> Probe:
    probe: Probe = model.cost_probe("seed")
    if probe.analytic is None:
        raise TypeError(f"{type(model).__name__}'s cost probe has no analytic cost to budget by")
    return probe


def image_tokens(model: nn.Module) -> list[int]:
    """Tokens reaching the MLP of every block of the model's (first) image encoder, from its static reducers."""
    from models.cost import token_schedule

    vit = vision_encoders(model)[0][1]
    return [t[2] for t in token_schedule(vit.blocks, vit.patch_embed.num_patches + vit.num_prefix_tokens)]


def analytic_flops(model: nn.Module, probe: Probe | None = None) -> float:
    """FLOPs per sample of the model's seed probe from the analytic cost model (no forward pass); the probe's
    analytic cost reads the model's reducers at call time, so one probe serves many settings."""
    probe = probe or _seed_probe(model)
    return float(probe.analytic().flops) / probe.samples


def solve(
    model: nn.Module, settings: Sequence[Any], apply: Callable[[Any], None], p: float, what: str, dense: float
) -> tuple[Any, float]:
    """The first of ``settings`` (ordered from least to most reduction) whose analytic FLOPs are at most
    ``(1 - p)`` of ``dense`` (the model's FLOPs before any reduction); ``apply`` installs a setting (other
    reducers stay as they are). Returns (setting, FLOPs ratio). An unreachable ``p`` is an error naming the most
    the settings reach."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{what}: --p is the share of FLOPs to remove, in [0, 1); got {p}")
    probe = _seed_probe(model)
    ratio = 1.0
    for setting in settings:
        apply(setting)
        ratio = analytic_flops(model, probe) / dense
        if ratio <= 1.0 - p + 1e-9:
            return setting, ratio
    raise ValueError(
        f"{what}: --p {p} asks for {1 - p:.3f} of the dense FLOPs, but the strongest setting reaches {ratio:.3f}; "
        "reduce tokens at more blocks or lower --p"
    )
