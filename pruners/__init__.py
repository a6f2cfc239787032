"""Pruner registry: ``--pruner NAME`` picks one of these."""

from __future__ import annotations

from pruners.base import Pruner

# name -> class; "none" trains and evaluates the dense model.
PRUNERS: dict[str, type[Pruner] | None] = {"none": None}


def build_pruner(name: str, config: dict) -> Pruner | None:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner '{name}'; choose one of {sorted(PRUNERS)}")
    cls = PRUNERS[name]
    return None if cls is None else cls(config)
