"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023; facebookresearch/ToMe).

In every block of every image encoder, after the attention residual and before the MLP, ``r`` tokens are
merged into their most similar partners (cosine similarity of the head-averaged keys; the CLS token, and a
distillation token, protected), as size-weighted means; the sizes travel with the tokens and, with
``prop_attn``, the attention adds ``log(size)`` of each key. ``r`` is one number for every block or a list per
block (missing blocks merge nothing), or is solved from ``--p`` (the share of FLOPs to remove) with the analytic
cost model. The merging is model code (:class:`models.token_ops.ToMeReducer`), saved in the architecture
description; ToMe works off the shelf (``--evaluate``) or fine-tuned, where its authors turn proportional
attention off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from models.token_ops import ToMeReducer
from pruners.base import Pruner
from pruners.token_budget import analytic_flops, image_tokens, solve, vision_encoders
from utils import log

__all__ = ["ToMe"]


class ToMe(Pruner):
    """Config: ``p`` (FLOPs share to remove; solves a constant ``r``) or ``tome.r``, and the ``tome`` section."""

    name = "tome"
    exports_model = True
    DEFAULTS: dict[str, Any] = {
        "epochs": None,  # fine-tuning epochs with this pruner (None: max_epoch; --epoch wins)
        "r": None,  # tokens merged per block: one int, or a list per block; None: solved from --p
        "prop_attn": True,  # proportional attention (ToMe's default off the shelf; its authors train without)
        "teacher": "",  # a model to distil while fine-tuning (teacher.path of this pruner's runs; "": the config's)
    }
    FLAGS = {"--r": ("tome.r", int, "tokens merged in every block (or a list in the config)")}

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options()
        self.p = config.get("p")
        r = opts["r"]
        if (self.p is None) == (r is None):
            raise ValueError(
                "tome: give either --p (the share of FLOPs to remove; a constant r is solved for it) or tome.r "
                f"(--r), not {'both' if r is not None else 'neither'}"
            )
        if r is not None:
            values = r if isinstance(r, list) else [r]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ValueError(f"tome.r must be a non-negative int or a list of them, got {r!r}")
        self.opts = opts
        self.r = r
        self.reducers: list[list[ToMeReducer]] = []
        self.model: nn.Module | None = None
        self.flops_ratio: float | None = None

    def _per_block(self, r: int | list[int], depth: int) -> list[int]:
        if isinstance(r, int):
            return [r] * depth
        if len(r) > depth:
            raise ValueError(f"tome.r lists {len(r)} blocks but the ViT has {depth}")
        return list(r) + [0] * (depth - len(r))

    def _set(self, r: int | list[int]) -> None:
        for reducers in self.reducers:
            for reducer, value in zip(reducers, self._per_block(r, len(reducers))):
                reducer.r = value

    def attach(self, model: nn.Module) -> None:
        self.model = model
        dense = analytic_flops(model) if getattr(model, "cost_probe", None) is not None else None
        if self.p is not None and dense is None:
            raise ValueError(f"tome: --p needs the model's cost probe; {type(model).__name__} has none")
        for _, vit in vision_encoders(model):
            reducers = [ToMeReducer(0, self.opts["prop_attn"], protect=vit.num_prefix_tokens) for _ in vit.blocks]
            for block, reducer in zip(vit.blocks, reducers):
                block.token_hooks.append(reducer)
            self.reducers.append(reducers)
        if self.r is None:  # --p: the smallest constant r that removes that share of FLOPs
            vit = vision_encoders(model)[0][1]
            most = (vit.patch_embed.num_patches + 1) // 2
            self.r, ratio = solve(model, list(range(most + 1)), self._set, float(self.p), "tome", dense)
            log.info("tome: r = %d removes %.1f%% of the FLOPs (--p %g)", self.r, 100 * (1 - ratio), self.p)
        self._set(self.r)
        self.flops_ratio = analytic_flops(model) / dense if dense else None

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        self._set(0)
        try:
            yield
        finally:
            self._set(self.r)

    def state_dict(self) -> dict:
        return {"r": self.r}

    def load_state_dict(self, state: dict) -> None:
        self.r = state["r"]
        self._set(self.r)

    def report(self) -> dict:
        out: dict[str, Any] = {"r": self.r, "prop_attn": self.opts["prop_attn"]}
        if self.model is not None:
            out["image_tokens"] = image_tokens(self.model)
        if self.flops_ratio is not None:
            out["flops_ratio"] = round(self.flops_ratio, 4)
        return out
