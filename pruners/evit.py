"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022; youweiliang/evit).

At the chosen blocks of every image encoder (EViT's ``drop_loc``, 3, 6 and 9 of a 12-block ViT), after the
attention residual and before the MLP, the ``ceil(keep_rate * N)`` tokens the CLS token attends to most (averaged
over heads) are kept and the others fused into one token weighted by that attention. The reduction itself is
model code (:class:`models.token_ops.EViTReducer`), saved in the architecture description, so a fine-tuned model
evaluates without this module; the pruner owns what training needs: where the reducers go, the keep rate (given,
or solved from ``--p``, the share of FLOPs to remove, with the analytic cost model) and EViT's warm-up, which
lowers the keep rate from 1 to its target along a cosine (``adjust_keep_rate``). As an option the text encoder's
tokens (statements, questions, captions) are reduced the same way, after the self-attention of the chosen layers
and before their cross-attention.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torch import nn

from models.token_ops import EViTReducer
from pruners.base import Pruner
from pruners.token_budget import analytic_flops, image_tokens, solve, text_encoders, vision_encoders
from utils import log

__all__ = ["EViT", "keep_rate_at"]


def keep_rate_at(epoch: float, start: float, shrink: float, target: float) -> float:
    """EViT's warm-up: 1 before epoch ``start``, then a cosine from 1 down to ``target`` over ``shrink`` epochs
    (``epoch`` may be fractional: iterations count), ``target`` after."""
    if epoch < start:
        return 1.0
    if shrink <= 0 or epoch >= start + shrink:
        return target
    return target + (1.0 - target) * (math.cos((epoch - start) / shrink * math.pi) + 1.0) * 0.5


def _locations(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"evit.{what} must be a list of block indices, got {value!r}")
    if len(set(value)) != len(value) or any(i < 0 for i in value):
        raise ValueError(f"evit.{what} must list distinct non-negative block indices, got {value}")
    return sorted(value)


class EViT(Pruner):
    """Config: ``p`` (FLOPs share to remove; solves ``keep_rate``) or ``evit.keep_rate``, and the ``evit``
    section (see ``DEFAULTS``)."""

    name = "evit"
    exports_model = True
    DEFAULTS: dict[str, Any] = {
        "epochs": None,  # fine-tuning epochs with this pruner (None: max_epoch; --epoch wins)
        "keep_rate": None,  # kept share of the image tokens at each reducing block; None: solved from --p
        "locations": [3, 6, 9],  # image-encoder blocks (0-based) that reduce, EViT's drop_loc
        "fuse": True,  # fuse the dropped tokens into one (EViT's --fuse_token)
        "text_keep_rate": 1.0,  # kept share of the text tokens at text_locations (1: text untouched)
        "text_locations": [],  # text-encoder layers that reduce, after their self-attention
        "shrink_start_epoch": 0,  # keep rate 1 before this epoch (EViT's warm-up) ...
        "shrink_epochs": 0,  # ... then a cosine down to the target over this many epochs (0: the target at once)
    }
    FLAGS = {
        "--keep_rate": ("evit.keep_rate", float, "kept share of image tokens at each reducing block"),
        "--drop_loc": ("evit.locations", str, "image blocks that reduce, e.g. '[3, 6, 9]'"),
    }

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options()
        if isinstance(opts["locations"], str):  # the --drop_loc flag, as in the seed: "(3, 6, 9)"
            opts["locations"] = [int(v) for v in opts["locations"].strip("()[] ").split(",") if v.strip()]
        self.locations = _locations(opts["locations"], "locations")
        self.text_locations = _locations(opts["text_locations"], "text_locations")
        self.p = config.get("p")
        keep = opts["keep_rate"]
        if (self.p is None) == (keep is None):
            raise ValueError(
                "evit: give either --p (the share of FLOPs to remove; the keep rate is solved for it) or "
                f"evit.keep_rate (--keep_rate), not {'both' if keep is not None else 'neither'}"
            )
        if keep is not None and not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"evit.keep_rate must be in (0, 1], got {keep}")
        if not 0.0 < float(opts["text_keep_rate"]) <= 1.0:
            raise ValueError(f"evit.text_keep_rate must be in (0, 1], got {opts['text_keep_rate']}")
        if float(opts["text_keep_rate"]) < 1.0 and not self.text_locations:
            raise ValueError("evit.text_keep_rate < 1 needs evit.text_locations (the text layers that reduce)")
        if not self.locations and not self.text_locations:
            raise ValueError("evit: no locations and no text_locations: nothing would be reduced")
        if opts["shrink_start_epoch"] < 0 or opts["shrink_epochs"] < 0:
            raise ValueError("evit.shrink_start_epoch and evit.shrink_epochs must be >= 0")
        self.opts = opts
        self.target = None if keep is None else float(keep)
        self.text_target = float(opts["text_keep_rate"])
        self.keep, self.text_keep = 1.0, 1.0
        self.max_epoch = int(config.get("max_epoch", 1))
        self.image_reducers: list[EViTReducer] = []
        self.text_reducers: list[EViTReducer] = []
        self.model: nn.Module | None = None
        self.dense_flops = self.flops_ratio = None

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> None:
        self.model = model
        self.dense_flops = analytic_flops(model) if getattr(model, "cost_probe", None) is not None else None
        if self.p is not None and self.dense_flops is None:
            raise ValueError(f"evit: --p needs the model's cost probe; {type(model).__name__} has none")
        for path, vit in vision_encoders(model) if self.locations else []:
            depth = len(vit.blocks)
            if self.locations[-1] >= depth:
                raise ValueError(f"evit.locations {self.locations} exceed the {depth} blocks of {path or 'the ViT'}")
            for i in self.locations:
                reducer = EViTReducer(1.0, self.opts["fuse"], protect=vit.num_prefix_tokens)
                vit.blocks[i].token_hooks.append(reducer)
                self.image_reducers.append(reducer)
        if self.text_locations:
            encoders = text_encoders(model)
            if not encoders:
                raise ValueError(f"evit.text_locations given, but {type(model).__name__} has no text encoder")
            for path, bert in encoders:
                if self.text_locations[-1] >= len(bert.layers):
                    raise ValueError(f"evit.text_locations {self.text_locations} exceed the layers of {path}")
                for i in self.text_locations:
                    reducer = EViTReducer(1.0, self.opts["fuse"], protect=1, point="post_self_attn")
                    bert.layers[i].token_hooks.append(reducer)
                    self.text_reducers.append(reducer)
        if self.target is None:  # --p: the highest keep rate that removes that share of FLOPs, text reduced too
            self._apply(1.0, self.text_target)
            rates = [round(1.0 - k / 100, 2) for k in range(0, 100)]
            self.target, ratio = solve(model, rates, self._set_image, float(self.p), "evit", self.dense_flops)
            log.info(
                "evit: keep rate %.2f removes %.1f%% of the FLOPs (--p %g)", self.target, 100 * (1 - ratio), self.p
            )
        self._apply(self.target, self.text_target)
        self.flops_ratio = analytic_flops(model) / self.dense_flops if self.dense_flops else None
        self._apply(*self._rates(0.0))

    def _set_image(self, keep: float) -> None:
        for r in self.image_reducers:
            r.keep_rate = keep

    def _apply(self, keep: float, text_keep: float) -> None:
        self.keep, self.text_keep = keep, text_keep
        self._set_image(keep)
        for r in self.text_reducers:
            r.keep_rate = text_keep

    def _rates(self, epoch: float) -> tuple[float, float]:
        start, shrink = float(self.opts["shrink_start_epoch"]), float(self.opts["shrink_epochs"])
        return keep_rate_at(epoch, start, shrink, self.target), keep_rate_at(epoch, start, shrink, self.text_target)

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        saved = self.keep, self.text_keep
        self._apply(1.0, 1.0)
        try:
            yield
        finally:
            self._apply(*saved)

    def step(self, model: nn.Module, step: int, total: int, lr: float = 0.0) -> None:
        """The keep rates for the next step, on EViT's warm-up schedule (``step`` of ``total`` in the phase)."""
        self._apply(*self._rates(step / total * self.max_epoch))

    def at_target(self) -> bool:
        return self.keep == self.target and self.text_keep == self.text_target

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"keep": self.keep, "text_keep": self.text_keep, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        self.target = float(state["target"])
        self._apply(float(state["keep"]), float(state["text_keep"]))

    def report(self) -> dict:
        out: dict[str, Any] = {
            "keep_rate": self.keep,
            "target_keep_rate": self.target,
            "locations": self.locations,
            "fuse": self.opts["fuse"],
        }
        if self.text_reducers:
            out |= {"text_keep_rate": self.text_keep, "text_locations": self.text_locations}
        if self.model is not None:
            out["image_tokens"] = image_tokens(self.model)
        if self.flops_ratio is not None:
            out["flops_ratio_at_target"] = round(self.flops_ratio, 4)
        return out
