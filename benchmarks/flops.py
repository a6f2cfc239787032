"""FLOPs and MACs of one call, counted at the ATen dispatcher.

Two conventions are counted in the same pass:

* **FLOPs**: :class:`torch.utils.flop_counter.FlopCounterMode`, two per multiply-add of every
  matrix product (linear, matmul, bmm, conv, attention). Its registry has no formula for the CPU
  attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, what
  ``F.scaled_dot_product_attention`` runs on the CPU), so attention would silently count zero there;
  :func:`sdpa_flops` is registered for it on import.
* **MACs**: the seeds' convention (fvcore ``FlopCountAnalysis``, which counts "one FLOP per fused
  multiply-add"): one per multiply-add of linear / matmul / bmm / einsum / conv, plus
  ``5 * numel`` for every affine LayerNorm input (``4 * numel`` without affine), as fvcore's
  ``norm_flop_counter`` does. GELU, softmax, dropout, mask products and losses count nothing. fvcore's
  other handles (batch / group / instance norm, nearest and bilinear upsampling, adaptive average
  pooling, grid sampling) are not mirrored: no backbone here uses those ops in a forward pass.

Broadcasting matrix products (BLIP's VQA questions attending to one image) are counted over the
broadcast batch, as both fvcore and the decomposed matmul do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = ["Cost", "count", "layer_norm_macs", "sdpa_flops"]

aten = torch.ops.aten


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(q k^T) v``: every query row meets every key (d_q multiply-adds) and weights
    every value (d_v multiply-adds). Written from the query's leading dims, so a key / value batch
    that broadcasts (or grouped key heads) costs what the product over the query batch costs."""
    rows = math.prod(query_shape[:-1])
    s_k, d_q, d_v = key_shape[-2], query_shape[-1], value_shape[-1]
    if key_shape[-1] != d_q or value_shape[-2] != s_k:
        raise ValueError(
            f"attention shapes do not fit: q {tuple(query_shape)}, k {tuple(key_shape)}, v {tuple(value_shape)}"
        )
    return 2 * rows * s_k * (d_q + d_v)


_CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:  # a later torch may ship its own formula; keep that one
    register_flop_formula(_CPU_SDPA)(sdpa_flops)


def layer_norm_macs(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    """fvcore's LayerNorm estimate: 5 per element with an affine weight, else 4."""
    return math.prod(input_shape) * (5 if weight_shape is not None else 4)


def _halved(formula: Callable[..., int]) -> Callable[..., int]:
    # Every registered torch formula counts 2 per multiply-add; the seeds count 1.
    def macs(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return formula(*args, out_val=out_val, **kwargs) // 2

    macs._get_raw = True  # the wrapped formula already unpacks shapes itself
    return macs


def _mac_mapping() -> dict[Any, Callable[..., int]]:
    # Built at every count so formulas registered later (e.g. by a pruner's custom op) are included.
    mapping: dict[Any, Callable[..., int]] = {op: _halved(f) for op, f in flop_registry.items()}
    mapping[aten.native_layer_norm] = layer_norm_macs
    return mapping


@dataclass
class Cost:
    """Totals of one counted call, with the per-module split of both conventions."""

    flops: int
    macs: int
    flops_by_module: dict[str, int] = field(default_factory=dict)
    macs_by_module: dict[str, int] = field(default_factory=dict)

    def scaled(self, factor: float) -> Cost:
        return Cost(
            self.flops * factor,
            self.macs * factor,
            {k: v * factor for k, v in self.flops_by_module.items()},
            {k: v * factor for k, v in self.macs_by_module.items()},
        )


class _Root(nn.Module):
    """Calls ``fn`` with ``model`` registered as its child, so the module tracker names every
    submodule by its path in ``model`` even when ``fn`` calls submodules directly."""

    def __init__(self, model: nn.Module, fn: Callable[[], Any]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self) -> Any:
        return self._fn()


def _by_module(counts: Mapping[str, Mapping[Any, int]], depth: int) -> dict[str, int]:
    # Counts are inclusive (a module holds its children's) and containers that are never called
    # (ModuleList) are absent, so a group sums its outermost tracked modules.
    prefix = f"{_Root.__name__}.model."
    totals = {
        tuple(name[len(prefix) :].split(".")): int(sum(per_op.values()))
        for name, per_op in counts.items()
        if name.startswith(prefix)
    }
    out: dict[str, int] = {}
    for path, value in totals.items():
        for level in range(1, min(depth, len(path)) + 1):
            group = path[:level]
            if any(path[:i] in totals for i in range(level, len(path))):
                continue  # an enclosing module inside this group already holds it
            key = ".".join(group)
            out[key] = out.get(key, 0) + value
    return dict(sorted(out.items()))


def count(fn: Callable[[], Any], model: nn.Module | None = None, depth: int = 1) -> tuple[Any, Cost]:
    """Run ``fn()`` once and return (its result, its :class:`Cost`).

    The caller chooses the mode (``eval()``, ``no_grad``); counting follows whatever runs, on any
    device including ``meta``. With ``model``, the per-module split names submodules of ``model``
    down to ``depth`` levels (1: its direct children, e.g. ``visual_encoder``, ``text_encoder``).
    """
    flop_mode = FlopCounterMode(display=False)
    mac_mode = FlopCounterMode(display=False, custom_mapping=_mac_mapping())
    call = _Root(model, fn) if model is not None else fn
    # Nested modes see the same leaf ops: the inner one passes every op it does not decompose on to
    # the outer one, so one forward pass yields both conventions.
    with flop_mode, mac_mode:
        result = call()
    cost = Cost(
        flops=int(flop_mode.get_total_flops()),
        macs=int(mac_mode.get_total_flops()),
        flops_by_module=_by_module(flop_mode.get_flop_counts(), depth),
        macs_by_module=_by_module(mac_mode.get_flop_counts(), depth),
    )
    return result, cost
