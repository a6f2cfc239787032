"""PuMer: text-informed token pruning and modality-aware merging (Cao, Paranjape, Hajishirzi, ACL 2023;
csarron/PuMer), on single-stream backbones (ViLT).

At each block of ``reduce_layers`` (0-based), after the attention residual and before the MLP, a
:class:`models.token_ops.PuMerReducer` drops the ``prune_r`` share of image tokens the text attends to least, merges
``merge_r`` (of the image length before pruning) of the kept image tokens and ``merge_text`` of the text tokens
(spec pumer_vilt.md 1-2). The reducers have no weights; they are model code, saved in the architecture description,
so the result evaluates with ``--evaluate --pretrained`` alone.

The training recipe (spec 4) is the config's, not this module's: start from the *pre-trained* backbone
(``pretrained``), distil the logits of the fine-tuned dense model (``teacher.path``, soft KL at temperature 1; the
engine's ``(1 - alpha) task + alpha KD`` at alpha 0.5 is PuMer's ``task + 1.0 KD`` at half the scale, the same
under AdamW), AdamW betas (0.9, 0.98), weight decay 0.01 without biases and norms, linear decay with 10 % warm-up,
LR x 10 on the classifier (``lr_mult``). The pruner only attaches the reducers, switches them off for the dense
evaluation at the start, and reports the token schedule and the FLOPs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from models.token_ops import PuMerReducer
from pruners.base import Pruner
from pruners.token_budget import analytic_flops
from utils import log

__all__ = ["PuMer", "parse_layers"]


def parse_layers(value: Any) -> list[int]:
    """``reduce_layers`` as a list of block indices: a list, ``"2,5,8"``, or PuMer's digit string ``"258"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        parts = value.split(",") if "," in value else list(value.strip())
        try:
            return [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ValueError(f"pumer.reduce_layers: cannot read {value!r} (give e.g. 2,5,8 or 258)") from None
    if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"pumer.reduce_layers must be a list of block indices, got {value!r}")


class PuMer(Pruner):
    """Config: the ``pumer`` section (names as PuMer's: ``prune_r``, ``merge_r``, ``merge_text``, ``reduce_layers``,
    ``sim_method``, ``merge_style``) and the flags of the same names."""

    name = "pumer"
    exports_model = True
    DEFAULTS: dict[str, Any] = {
        "epochs": None,  # training epochs with the reducers (None: max_epoch; --epoch wins); PuMer: 20
        "prune_r": 0.1,  # share of image tokens removed at each reduce layer
        "merge_r": 0.3,  # image tokens merged, as a share of the image length before pruning
        "merge_text": 0.2,  # text tokens merged, as a share of the (padded) text length
        "reduce_layers": [2, 5, 8],  # 0-based blocks (ViLT-B/32: 258 for VQA and NLVR2, 2468 for VE)
        "sim_method": "mean_head",  # mean_head (the paper's) | first_head | k_metric
        "merge_style": "tome",  # tome (the paper's: plain mean) | tip | diff (ablations)
        "teacher": "",  # the fine-tuned dense model to distil (teacher.path of this pruner's runs; "": the config's)
    }
    FLAGS = {
        "--prune_r": ("pumer.prune_r", float, "share of image tokens pruned at each reduce layer"),
        "--merge_r": ("pumer.merge_r", float, "image merge share (of the length before pruning)"),
        "--merge_text": ("pumer.merge_text", float, "text merge share"),
        "--reduce_layers": ("pumer.reduce_layers", parse_layers, "blocks that reduce: 2,5,8 or 258"),
    }

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options()
        if config.get("p") is not None:
            raise ValueError("pumer: --p means nothing here; set prune_r / merge_r / merge_text (--prune_r ...)")
        self.layers = parse_layers(opts["reduce_layers"])
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"pumer.reduce_layers must list distinct blocks, got {opts['reduce_layers']!r}")
        depth = config.get("vilt_depth")
        bad = [i for i in self.layers if i < 0 or (depth is not None and i >= depth)]
        if bad:  # checked again on the model in attach (a file may hold another depth)
            raise ValueError(f"pumer.reduce_layers {bad} outside the model's {depth} blocks (vilt_depth)")
        # Checked here, before any data or weights are read.
        self.spec = {k: opts[k] for k in ("prune_r", "merge_r", "merge_text", "sim_method", "merge_style")}
        PuMerReducer(**self.spec)
        self.opts = opts
        self.reducers: list[tuple[nn.Module, PuMerReducer]] = []
        self.model: nn.Module | None = None
        self.dense_flops: float | None = None
        self.flops: float | None = None

    def attach(self, model: nn.Module) -> None:
        from models.vilt import ViLT

        if not isinstance(model, ViLT):
            raise TypeError(
                f"pumer reduces single-stream (text + image) models such as ViLT, not {type(model).__name__}"
            )
        blocks = model.transformer.blocks
        bad = [i for i in self.layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"pumer.reduce_layers {bad} outside the model's {len(blocks)} blocks")
        self.dense_flops = analytic_flops(model)
        for i in self.layers:
            reducer = PuMerReducer(**self.spec)
            blocks[i].token_hooks.append(reducer)
            self.reducers.append((blocks[i], reducer))
        self.flops = analytic_flops(model)
        self.model = model
        log.info(
            "pumer: p %g r %g t %g at blocks %s: %.3f of the dense FLOPs (the seed probe's text length)",
            self.spec["prune_r"],
            self.spec["merge_r"],
            self.spec["merge_text"],
            self.layers,
            self.flops / self.dense_flops,
        )

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        for block, reducer in self.reducers:
            block.token_hooks.remove(reducer)
        try:
            yield
        finally:
            for block, reducer in self.reducers:
                block.token_hooks.append(reducer)

    def report(self) -> dict:
        from models.vilt import vilt_schedule

        out: dict[str, Any] = {**self.spec, "reduce_layers": self.layers}
        if self.model is not None:
            model = self.model
            grid = model.transformer.patch_embed.grid_size
            schedule = vilt_schedule(model, model.max_text_len, grid[0] * grid[1] + 1)
            out["tokens_after_reduce_layers"] = {i: list(schedule[i][1]) for i in self.layers}
            out["flops_ratio"] = round(self.flops / self.dense_flops, 4)
        return out
