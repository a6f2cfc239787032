"""The analytic cost model: multiply-adds of every block type from its widths and token counts.

``FLOPs`` here are what ``torch.utils.flop_counter.FlopCounterMode`` counts (two per multiply-add of every
matrix product: linear layers, matmuls, attention, the patch convolution); ``seed MACs`` add fvcore's
LayerNorm estimate (5 per element) to the multiply-adds, the convention of the UPop / MADTP / PuMer tables.
The traced counts of :mod:`benchmarks.flops` are the check (tests hold the two equal); this module is what
methods steer by: it needs no forward pass, costs a dynamic token schedule from the counts a forward recorded
(``TokenState.counts``), and every primitive is plain arithmetic, so widths and token counts may be tensors
(continuous widths, keep probabilities) and the cost differentiates through them.

Layers:

* primitives: :func:`linear`, :func:`attention`, :func:`layer_norm`, and the ViT / MED block formulas
  :func:`vit_block_cost`, :func:`bert_layer_cost` on raw numbers;
* modules: :func:`vit_cost` (a :class:`~models.vit.VisionTransformer`), :func:`bert_cost` (a MED
  :class:`~models.med.BertModel`), :func:`lm_head_cost`, reading the widths and the token reducers of the
  module, with the token schedule from the reducers (:func:`token_schedule`) or from recorded counts;
* :class:`Probe`: a model's cost probe (``model.cost_probe(kind)``), a call to trace or time together with its
  analytic cost.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CountLog",
    "Cost",
    "DynamicSchedule",
    "Probe",
    "attention",
    "image_size",
    "random_images",
    "bert_cost",
    "bert_layer_cost",
    "blocks_cost",
    "layer_norm",
    "linear",
    "lm_head_cost",
    "recorded_counts",
    "replayed_counts",
    "token_schedule",
    "vit_block_cost",
    "vit_cost",
]

Number = Any  # int, float or a 0-d tensor (for differentiable costs)


@dataclass
class Cost:
    """``macs``: multiply-adds of matrix products; ``norm``: fvcore's LayerNorm count (5 per element)."""

    macs: Number = 0
    norm: Number = 0

    @property
    def flops(self) -> Number:
        """FlopCounterMode's convention: 2 per multiply-add."""
        return 2 * self.macs

    @property
    def seed_macs(self) -> Number:
        """The seeds' fvcore convention: multiply-adds plus LayerNorm."""
        return self.macs + self.norm

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.norm + other.norm)

    def __radd__(self, other: Any) -> Cost:
        if other == 0:  # sum() starts at 0
            return self
        return NotImplemented

    def scaled(self, factor: Number) -> Cost:
        return Cost(self.macs * factor, self.norm * factor)


# ------------------------------------------------------------------------------------------------ primitives


def linear(rows: Number, d_in: Number, d_out: Number) -> Cost:
    """A Linear (or a matmul) applied to ``rows`` vectors of ``d_in``."""
    return Cost(rows * d_in * d_out)


def attention(rows: Number, keys: Number, heads: Number, d_qk: Number, d_v: Number | None = None) -> Cost:
    """``softmax(q k^T) v`` for ``rows`` queries (batch x query tokens) over ``keys`` keys per head."""
    return Cost(rows * keys * heads * (d_qk + (d_qk if d_v is None else d_v)))


def layer_norm(rows: Number, dim: Number, affine: bool = True) -> Cost:
    return Cost(0, rows * dim * (5 if affine else 4))


def vit_block_cost(
    batch: Number,
    dim: Number,
    heads: Number,
    head_dim: Number,
    hidden: Number,
    t_in: Number,
    t_out: Number | None = None,
    v_dim: Number | None = None,
    extra: Cost | None = None,
    v_proj: Number | None = None,
) -> Cost:
    """A pre-norm ViT block: ``t_in`` tokens through the attention, ``t_out`` (default ``t_in``) through the
    MLP; ``v_dim`` is the value width the attention product runs at, summed over heads (default
    ``heads * head_dim``), ``v_proj`` the width of the value and output projections (default ``v_dim``; less
    when uneven value widths are padded for the product); ``extra`` is what its token reducers compute."""
    t_out = t_in if t_out is None else t_out
    qk = heads * head_dim
    v = qk if v_dim is None else v_dim
    vp = v if v_proj is None else v_proj
    rows, rows_out = batch * t_in, batch * t_out
    cost = layer_norm(rows, dim) + linear(rows, dim, 2 * qk + vp)
    cost = cost + Cost(rows * t_in * (qk + v)) + linear(rows, vp, dim)
    cost = cost + layer_norm(rows_out, dim) + linear(rows_out, dim, hidden) + linear(rows_out, hidden, dim)
    return cost if extra is None else cost + extra


def bert_layer_cost(
    batch: Number,
    dim: Number,
    heads: Number,
    head_dim: Number,
    hidden: Number,
    t_self: Number,
    t_mid: Number | None = None,
    t_ffn: Number | None = None,
    past: Number = 0,
    cross: Sequence[tuple[Number, ...]] = (),
    merge: bool = False,
    v_width: Number | None = None,
) -> Cost:
    """A post-norm MED layer: self-attention over ``t_self`` tokens (plus ``past`` cached keys), then, for the
    ``t_mid`` tokens left, one cross-attention per entry of ``cross`` — (heads, head_dim, kv_dim, kv_batch,
    kv_tokens[, value width]), two for NLVR2's twin layer, whose outputs ``merge`` into one with a
    Linear(2D, D) — then the FFN over ``t_ffn`` tokens. Key and value projections of the cross-attention run
    on their own batch (a question batch reading one broadcast image computes them once). ``v_width``: the
    self-attention's value width when its heads are uneven (the product runs padded to ``head_dim``)."""
    t_mid = t_self if t_mid is None else t_mid
    t_ffn = t_mid if t_ffn is None else t_ffn
    rows, rows_mid, rows_ffn = batch * t_self, batch * t_mid, batch * t_ffn
    inner = heads * head_dim
    v = inner if v_width is None else v_width
    cost = linear(rows, dim, 2 * inner + v) + attention(rows, t_self + past, heads, head_dim)
    cost = cost + linear(rows, v, dim) + layer_norm(rows, dim)
    for c_heads, c_dim, kv_dim, kv_batch, kv_tokens, *c_v in cross:
        c_inner = c_heads * c_dim
        cv = c_v[0] if c_v else c_inner
        cost = cost + linear(rows_mid, dim, c_inner) + linear(kv_batch * kv_tokens, kv_dim, c_inner + cv)
        cost = cost + attention(rows_mid, kv_tokens, c_heads, c_dim) + linear(rows_mid, cv, dim)
    if cross:
        cost = cost + layer_norm(rows_mid, dim)
        if merge:
            cost = cost + linear(rows_mid, 2 * dim, dim)
    return cost + linear(rows_ffn, dim, hidden) + linear(rows_ffn, hidden, dim) + layer_norm(rows_ffn, dim)


# ------------------------------------------------------------------------------------------------ schedules


class DynamicSchedule(ValueError):
    """A block's hooks decide their token counts per input: only counts a forward recorded can cost it."""


def _hooks(block: nn.Module) -> list[Any]:
    return list(getattr(block, "token_hooks", None) or [])


def _static(block: nn.Module, point: str, tokens: int, what: str) -> int:
    for hook in _hooks(block):
        if hook.point != point:
            continue
        out = getattr(hook, "out_tokens", None)
        if out is None:
            raise DynamicSchedule(
                f"{what}: {hook!r} decides its token count per input; cost it from the counts a forward recorded "
                "(TokenState.counts)"
            )
        tokens = out(tokens)
    return tokens


def token_schedule(blocks: Sequence[nn.Module], tokens: int, what: str = "the model") -> list[tuple[int, int, int]]:
    """Per block (tokens into its attention, after its self-attention sub-layer, into its MLP), from ``tokens``
    entering the first block and the static reducers of each block (their ``out_tokens``)."""
    out = []
    for block in blocks:
        t_in = _static(block, "pre_attn", tokens, what)
        t_mid = _static(block, "post_self_attn", t_in, what)
        tokens = _static(block, "post_attn", t_mid, what)
        out.append((t_in, t_mid, tokens))
    return out


class CountLog:
    """Token counts that forwards recorded, per block, in call order (:func:`recorded_counts`)."""

    def __init__(self) -> None:
        self.calls: dict[int, list[tuple[int, int, int]]] = {}
        self.names: dict[int, str] = {}

    def pop(self, blocks: Sequence[nn.Module], what: str) -> dict[int, tuple[int, int, int]]:
        """The counts of the next recorded call of the encoder made of ``blocks``."""
        out = {}
        for block in blocks:
            if not isinstance(getattr(block, "token_hooks", None), list):  # a skipped block
                out[block.index] = (0, 0, 0)
                continue
            queue = self.calls.get(id(block))
            if not queue:
                raise ValueError(f"{what}: no recorded forward left for {self.names.get(id(block), 'a block')}")
            out[block.index] = queue.pop(0)
        return out

    def per_block(self) -> dict[str, list[tuple[int, int, int]]]:
        """``{block path: [counts of each call]}`` (what is left to replay)."""
        return {self.names[k]: list(v) for k, v in self.calls.items()}


_REPLAY: list[CountLog] = []


@contextlib.contextmanager
def recorded_counts(model: nn.Module) -> Iterator[CountLog]:
    """Record the token counts of every block forward of ``model`` while the context is open (forward hooks on the
    blocks; each block's counts in call order)."""
    log = CountLog()
    handles = []
    for name, module in model.named_modules():
        if not hasattr(module, "index") or not isinstance(getattr(module, "token_hooks", None), list):
            continue
        log.names[id(module)] = name

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            state = output[1] if isinstance(output, tuple) and len(output) == 2 else None
            counts = getattr(state, "counts", None)
            if counts is not None and module.index in counts:
                log.calls.setdefault(id(module), []).append(tuple(counts[module.index]))

        handles.append(module.register_forward_hook(hook))
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replayed_counts(log: CountLog) -> Iterator[CountLog]:
    """While open, the analytic cost of an encoder whose token counts depend on the input takes them from ``log``
    (the encoder's next recorded call), so a probe's ``analytic`` costs the forward that was just run."""
    _REPLAY.append(log)
    try:
        yield log
    finally:
        _REPLAY.pop()


def _schedule(
    blocks: Sequence[nn.Module], tokens: int, counts: Mapping[int, tuple[int, int, int]] | None, what: str
) -> list[tuple[int, int, int]]:
    if counts is None:
        try:
            return token_schedule(blocks, tokens, what)
        except DynamicSchedule:
            if not _REPLAY:
                raise
            counts = _REPLAY[-1].pop(blocks, what)
    missing = [i for i in range(len(blocks)) if i not in counts]
    if missing:
        raise ValueError(f"{what}: the recorded token counts lack blocks {missing}")
    return [tuple(counts[i]) for i in range(len(blocks))]


def _reducer_macs(block: nn.Module, t_in: int, t_mid: int, head_dim: int) -> Cost:
    """What a block's reducers compute themselves (ToMe's similarity matmul) per sample, on the tokens they see."""
    total = 0
    for hook in _hooks(block):
        macs = getattr(hook, "macs", None)
        if macs is not None:
            total = total + macs(t_mid if hook.point == "post_attn" else t_in, head_dim)
    return Cost(total)


# ------------------------------------------------------------------------------------------------ modules


def blocks_cost(
    blocks: Sequence[nn.Module],
    batch: Number,
    tokens: int,
    counts: Mapping[int, tuple[int, int, int]] | None = None,
    what: str = "the encoder",
) -> tuple[Cost, int]:
    """(cost, tokens out) of a stack of pre-norm blocks (:class:`~models.layers.Block`: ViT, CLIP's two towers) on
    ``batch`` sequences of ``tokens`` tokens, with the token schedule of their static reducers or ``counts``."""
    cost = Cost()
    for block, (t_in, t_mid, t_out) in zip(blocks, _schedule(blocks, tokens, counts, what)):
        if not hasattr(block, "attn"):  # a skipped block
            continue
        a = block.attn
        extra = _reducer_macs(block, t_in, t_mid, a.head_dim).scaled(batch)
        cost = cost + vit_block_cost(
            batch, a.dim, a.num_heads, a.head_dim, block.mlp.hidden, t_in, t_out, a.inner_dim, extra, a.value_inner_dim
        )
        tokens = t_out
    return cost, tokens


def vit_cost(
    vit: nn.Module,
    batch: Number = 1,
    grid: tuple[int, int] | None = None,
    counts: Mapping[int, tuple[int, int, int]] | None = None,
    head_rows: Number = 0,
) -> tuple[Cost, int]:
    """(cost, tokens out) of ``vit.forward_tokens`` on ``batch`` images of the model's size (or ``grid``
    patches): patch convolution, every block with its token schedule (static reducers, or ``counts`` recorded
    by a forward), the final LayerNorm; plus the classifier heads on ``head_rows`` tokens when asked."""
    grid = grid or tuple(vit.patch_embed.grid_size)
    conv = vit.patch_embed.proj
    n_patches = grid[0] * grid[1]
    cost = linear(batch * n_patches, conv.in_channels * math.prod(conv.kernel_size), conv.out_channels)
    tokens = n_patches + vit.num_prefix_tokens
    if getattr(vit, "norm_pre", None) is not None:  # CLIP's ln_pre
        cost = cost + layer_norm(batch * tokens, vit.embed_dim)
    blocks, tokens = blocks_cost(vit.blocks, batch, tokens, counts, "the ViT")
    cost = cost + blocks + layer_norm(batch * tokens, vit.embed_dim)
    if head_rows:
        for head in (vit.head, getattr(vit, "head_dist", None)):
            if isinstance(head, nn.Linear):
                cost = cost + linear(head_rows, head.in_features, head.out_features)
    return cost, tokens


def bert_cost(
    bert: nn.Module,
    batch: Number,
    tokens: int,
    encoder: Sequence[tuple[Number, Number]] = (),
    past: int = 0,
    counts: Mapping[int, tuple[int, int, int]] | None = None,
) -> tuple[Cost, int]:
    """(cost, tokens out) of a MED ``BertModel`` on ``batch`` texts of ``tokens`` tokens: embeddings LayerNorm,
    every layer with its token schedule. ``encoder`` lists the (batch, tokens) of the states each
    cross-attention reads (two for the NLVR2 twin model; empty for text mode)."""
    from models.med import BertTwinCrossAttention

    d = bert.config.hidden_size
    cost = layer_norm(batch * tokens, d)
    schedule = _schedule(bert.layers, tokens, counts, "the text transformer")
    for layer, (t_self, t_mid, t_ffn) in zip(bert.layers, schedule):
        if not hasattr(layer, "attention"):  # a skipped layer
            continue
        sa = layer.attention.self
        cross = []
        merge = False
        if encoder:
            ca = layer.crossattention
            if ca is None:
                raise ValueError("encoder states given to a text transformer without cross-attention")
            branches = [ca.self0, ca.self1] if isinstance(ca, BertTwinCrossAttention) else [ca.self]
            if len(branches) != len(encoder):
                raise ValueError(f"{len(encoder)} encoder states for {len(branches)} cross-attention branches")
            cross = [
                (b.num_heads, b.head_dim, b.kv_dim, kb, kt, b.value_inner_dim) for b, (kb, kt) in zip(branches, encoder)
            ]
            merge = isinstance(ca, BertTwinCrossAttention) and ca.output.merge_layer is not None
        layer_cost = bert_layer_cost(
            batch,
            d,
            sa.num_heads,
            sa.head_dim,
            layer.intermediate.hidden,
            t_self,
            t_mid,
            t_ffn,
            past,
            cross,
            merge,
            sa.value_inner_dim,
        )
        cost = cost + layer_cost + _reducer_macs(layer, t_self, t_mid, sa.head_dim).scaled(batch)
    return cost, schedule[-1][2] if schedule else tokens


def lm_head_cost(lm: nn.Module, rows: Number) -> Cost:
    """BLIP's LM head on ``rows`` positions: the prediction transform (dense + LayerNorm) and the vocabulary
    projection."""
    d = lm.config.hidden_size
    return linear(rows, d, d) + layer_norm(rows, d) + linear(rows, d, lm.config.vocab_size)


# ------------------------------------------------------------------------------------------------ probes


def image_size(model: nn.Module) -> tuple[int, int]:
    """The input size the model's image encoder was built for."""
    vit = getattr(model, "visual_encoder", None)  # BLIP
    vit = getattr(model, "visual", model) if vit is None else vit  # CLIP, or a ViT itself
    patch_embed = getattr(vit, "patch_embed", None)
    if patch_embed is None:
        raise TypeError(f"{type(model).__name__} has no visual_encoder.patch_embed or patch_embed to size images by")
    return tuple(patch_embed.img_size)


def random_images(model: nn.Module, n: int) -> Tensor:
    """``n`` random images of the model's input size on its device (drawn on the CPU with a fixed seed: the meta
    device has no generator)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, *image_size(model), generator=g).to(next(model.parameters()).device)


@dataclass
class Probe:
    """A call to count or time, from ``model.cost_probe``.

    ``samples`` is what its cost is divided by (pairs, images); ``mutates`` marks a training step that updates
    model state (momentum towers, queues), which the caller must restore; ``inputs`` says in words what is fed;
    ``analytic`` returns the same call's cost from :mod:`models.cost` (``None`` where the call's token counts
    depend on the data and only a traced forward knows them); ``shape`` holds the token counts it used.
    """

    run: Callable[[], Any]
    samples: int
    inputs: str
    mutates: bool = False
    analytic: Callable[[], Cost] | None = None
    shape: dict[str, Any] = field(default_factory=dict)
