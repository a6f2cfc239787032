"""Pruner registry: ``--pruner NAME`` picks one of these."""

from __future__ import annotations

from typing import Any

from pruners.base import Pruner
from pruners.evit import EViT
from pruners.madtp import MADTP
from pruners.platon import Platon
from pruners.pumer import PuMer
from pruners.tome import ToMe
from pruners.upop import UPop
from pruners.uvc import UVC

# name -> class; "none" trains and evaluates the dense model.
PRUNERS: dict[str, type[Pruner] | None] = {
    "none": None,
    "upop": UPop,
    "platon": Platon,
    "evit": EViT,
    "tome": ToMe,
    "madtp": MADTP,
    "pumer": PuMer,
    "uvc": UVC,
}

# Config keys every task accepts for its pruners: the shared ratio, the dense checkpoint pruners start
# from, and one section of options per pruner (its DEFAULTS).
PRUNER_DEFAULTS: dict[str, Any] = {
    # The share removed, method-specific (UPop: of the cost-weighted mask budget, default 0.5; PLATON: of the
    # masked weights, i.e. 1 - final_threshold). None: the pruner's own default.
    "p": None,
    "pruner_pretrained": "",  # the task-fine-tuned dense model a pruner starts from ("": pretrained)
    **{name: dict(cls.DEFAULTS) for name, cls in PRUNERS.items() if cls is not None},
}


def build_pruner(name: str, config: dict) -> Pruner | None:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner '{name}'; choose one of {sorted(PRUNERS)}")
    cls = PRUNERS[name]
    return None if cls is None else cls(config)
