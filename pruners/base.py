"""The interface every pruner implements; the engine and entry scripts talk to pruners only through it.

Structured pruners reach a model through its ``prunable_units()``; token pruners through the blocks'
``token_hook``; unstructured pruners through parameter names. A pruner never knows the task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch


class Pruner:
    name = "base"
    DEFAULTS: dict[str, Any] = {}  # the pruner's config section (config[name]) with its defaults
    # Command-line flags of the seed, each a shortcut for one config key: flag -> (key, type, help).
    FLAGS: dict[str, tuple[str, type, str]] = {}
    # The demo config ``--demo --pruner NAME`` reads for a task instead of the task's own (task -> YAML path
    # relative to the repository), where the method needs a different demo (e.g. a starting checkpoint).
    DEMO_CONFIGS: dict[str, str] = {}

    def __init__(self, config: dict):
        self.config = config

    @classmethod
    def options_from_p(cls, p: float) -> dict[str, Any]:
        """What ``--p`` (the top-level ``p``) sets in this pruner's section, for pruners whose own setting says the
        same thing another way (PLATON: ``final_threshold = 1 - p``); it beats the config file there, and an
        explicit flag for the same key must agree. Pruners that read ``p`` directly return {}."""
        return {}

    def options(self) -> dict[str, Any]:
        """The pruner's config section (``config[name]``) over its ``DEFAULTS``; an unknown key is an error."""
        opts = {**self.DEFAULTS, **(self.config.get(self.name) or {})}
        unknown = sorted(set(opts) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"unknown {self.name} option(s) {unknown}; valid: {sorted(self.DEFAULTS)}")
        return opts

    def attach(self, model: torch.nn.Module) -> None:
        """Add masks, gates and hooks to ``model`` (before the optimizer is built)."""
        raise NotImplementedError

    def param_groups(self) -> Iterable[dict]:
        """The pruner's own learnable tensors as optimizer groups (with their own ``lr``/``lr_scale``)."""
        return []

    def loss(self, model: torch.nn.Module, outputs: dict) -> torch.Tensor | None:
        """An extra loss term added to the task loss, or None."""
        return None

    # Whether the run's end exports the model as model_compressed.* (a model with other widths or token
    # reducers, which evaluates without pruner code); pruners that only zero weights leave it False.
    exports_model: bool = False

    def bypassed(self) -> contextlib.AbstractContextManager:
        """A context in which the attached model computes what the dense model does (the engine evaluates the
        starting point in it); masks that start at 1 need nothing, token reducers switch off."""
        return contextlib.nullcontext()

    def phases(self, cfg: Any) -> list[Any]:
        """The run as phases (``engine.PhaseSpec``): by default one phase of ``cfg.max_epoch`` epochs in which
        the pruner acts; UPop searches, compresses, then retrains."""
        from engine import PhaseSpec

        return [PhaseSpec("train", cfg.max_epoch)]

    def phase_end(self, name: str, model: torch.nn.Module) -> bool:
        """Called after the last epoch of phase ``name``, before its evaluation; returns True when the model
        changed structure (the engine then builds a fresh optimizer around it)."""
        return False

    def before_optimizer_step(self, model: torch.nn.Module, grad_scale: float = 1.0) -> None:
        """Called after backward, before the optimizer step (e.g. to read mask gradients); gradients are
        multiplied by ``grad_scale`` (the fp16 loss scale, else 1)."""

    def step(self, model: torch.nn.Module, step: int, total: int, lr: float = 0.0) -> None:
        """Called after every optimizer step of the phase the pruner acts in, before the gradients are
        cleared: ``step`` counts from 1 to ``total``, the phase's optimizer steps; ``lr`` is the learning rate
        that step used (of the first parameter group)."""

    # The evaluation split whose main metric selects the best epoch (None: "val" when the run has it).
    selection_split: str | None = None

    def epoch_start(self, epoch: int, engine: Any) -> None:
        """Called before every training epoch of a phase the pruner acts in (MADTP's controller moves its
        temperature here, from the cost measured after the last epoch)."""

    def epoch_end(self, epoch: int, engine: Any) -> None:
        """Called after every training epoch, before evaluation."""

    def at_target(self) -> bool:
        """Whether the model has reached the pruner's target (compressed, or at the final sparsity); only
        then can an epoch be the run's best."""
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def report(self) -> dict:
        """Sparsity, kept units, FLOPs: what results.json records about the pruner."""
        return {}
