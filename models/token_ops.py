"""Token reduction: pure tensor functions, and the reducers (token hooks) built on them.

The functions know nothing of models: top-k selection with the kept tokens left in their original order
(:func:`keep_topk`, :func:`complement`), fusion of the dropped tokens into one weighted token
(:func:`fuse_tokens`), the bipartite merge plan of ToMe (:func:`bipartite_plan`, a :class:`MergePlan` with
``merge`` / ``merge_weighted`` / ``unmerge``), and :func:`pad_tokens` for sequences of different lengths.

The reducers are model code: a reduced model saved by any method rebuilds them from the settings in its
architecture description (:func:`reducer_specs`, :func:`attach_reducers`), so it evaluates without pruner
code. Each is a token hook of :mod:`models.token_state` with a ``spec()`` (its settings, JSON-able) and
``out_tokens(n)`` (the tokens it leaves from ``n``, for the analytic cost model).

* :class:`EViTReducer` (Liang et al., ICLR 2022): keep the ``ceil(keep_rate * N)`` tokens that the CLS token
  attends to most (head-averaged attention) and, with ``fuse``, add one token that is their sum weighted by
  that attention (youweiliang/evit: evit.py, ``Block.forward``).
* :class:`ToMeReducer` (Bolya et al., ICLR 2023): merge ``r`` tokens by bipartite soft matching on the
  head-averaged keys, size-weighted, sizes carried between blocks, proportional attention optional
  (facebookresearch/ToMe: tome/merge.py, tome/patch/timm.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .token_state import POINTS, HookContext, TokenState

__all__ = [
    "REDUCERS",
    "EViTReducer",
    "MergePlan",
    "ToMeReducer",
    "attach_reducers",
    "bipartite_plan",
    "build_reducer",
    "complement",
    "fuse_tokens",
    "gather_tokens",
    "keep_topk",
    "pad_tokens",
    "reducer_specs",
    "remove_reducers",
]


# ------------------------------------------------------------------------------------------------ selection


def keep_topk(scores: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the ``k`` highest ``scores`` (B, N) of every row, in ascending (positional) order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def complement(index: Tensor, n: int) -> Tensor:
    """The indices (B, n - k) of ``range(n)`` that ``index`` (B, k, distinct per row) leaves out, ascending."""
    kept = torch.zeros(index.shape[0], n, dtype=torch.int8, device=index.device).scatter(1, index, 1)
    # A stable sort puts the left-out positions (0) first, in ascending order; no data-dependent shapes, so it
    # also runs on the meta device.
    return kept.argsort(dim=1, stable=True)[:, : n - index.shape[1]]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Tokens ``index`` (B, K) of ``x`` (B, N, C) -> (B, K, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def fuse_tokens(x: Tensor, weights: Tensor, normalize: bool = False) -> Tensor:
    """One token (B, 1, C) from tokens ``x`` (B, M, C): their sum weighted by ``weights`` (B, M), divided by
    the weights' sum when ``normalize`` (EViT sums raw attention weights; MADTP normalises)."""
    w = weights / weights.sum(dim=1, keepdim=True) if normalize else weights
    return (x * w[..., None].to(x.dtype)).sum(dim=1, keepdim=True)


def pad_tokens(sequences: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Batches of token sequences of different lengths (each (B_i, T_i, C), with (B_i, T_i) 0/1 masks) as one
    (sum B_i, max T_i, C) tensor padded with zeros, and its mask (0 on the padding)."""
    if not sequences:
        raise ValueError("pad_tokens needs at least one batch")
    length = max(s.shape[1] for s in sequences)
    xs = [torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s in sequences]
    ms = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return torch.cat(xs), torch.cat(ms)


# ------------------------------------------------------------------------------------------------ merging


@dataclass
class MergePlan:
    """Which tokens merge into which, from :func:`bipartite_plan`.

    The tokens are split by parity into set A (even positions) and set B (odd). ``unmerged`` (B, Na - r) and
    ``src`` (B, r) index set A, ``dst`` (B, r) indexes set B: A-token ``src[:, i]`` merges into B-token
    ``dst[:, i]``. The merged sequence is ``[A tokens kept, B tokens]`` (with a distillation token, the two
    protected tokens first).
    """

    unmerged: Tensor
    src: Tensor
    dst: Tensor
    tokens: int  # N before merging
    distill: bool = False

    @property
    def r(self) -> int:
        return self.src.shape[1]

    def _order(self, kept: Tensor, b_set: Tensor) -> Tensor:
        if self.distill:
            return torch.cat([kept[:, :1], b_set[:, :1], kept[:, 1:], b_set[:, 1:]], dim=1)
        return torch.cat([kept, b_set], dim=1)

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """``x`` (B, N, C) -> (B, N - r, C): every B token reduced (``mean``, ``sum``, ``amax``) with the A
        tokens merged into it."""
        a_set, b_set = x[:, ::2], x[:, 1::2]
        kept = gather_tokens(a_set, self.unmerged)
        moved = gather_tokens(a_set, self.src)
        index = self.dst[..., None].expand(-1, -1, x.shape[-1])
        b_set = b_set.scatter_reduce(1, index, moved, reduce=mode, include_self=True)
        return self._order(kept, b_set)

    def merge_weighted(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        """Size-weighted merge: each merged token is the mean of its parts weighted by how many input tokens
        each stands for; returns the merged tokens and their sizes (B, N - r). ``size=None``: all ones."""
        if size is None:
            size = x.new_ones(x.shape[:2])
        s = size[..., None].to(x.dtype)
        # One merge of the weighted tokens with their sizes as an extra channel (one gather / scatter, not two).
        merged = self.merge(torch.cat([x * s, s], dim=-1), "sum")
        total = merged[..., -1:]
        return merged[..., :-1] / total, total[..., 0]

    def positions(self, positions: Tensor) -> Tensor:
        """The input positions (B, N) carried to the merged tokens: each keeps its own (a B token that
        absorbed A tokens keeps the B token's)."""
        a_set, b_set = positions[:, ::2], positions[:, 1::2]
        return self._order(a_set.gather(1, self.unmerged), b_set)

    def unmerge(self, x: Tensor) -> Tensor:
        """Merged tokens (B, N - r, C) back to (B, N, C): every input token takes the value of the token it
        went into."""
        n_kept = self.unmerged.shape[1]
        if self.distill:
            x = torch.cat([x[:, :1], x[:, 2 : 1 + n_kept], x[:, 1:2], x[:, 1 + n_kept :]], dim=1)
        kept, b_set = x[:, :n_kept], x[:, n_kept:]
        c = x.shape[-1]
        out = x.new_zeros(x.shape[0], self.tokens, c)
        out[:, 1::2] = b_set
        a_set = out[:, ::2].clone()
        a_set.scatter_(1, self.unmerged[..., None].expand(-1, -1, c), kept)
        a_set.scatter_(1, self.src[..., None].expand(-1, -1, c), gather_tokens(b_set, self.dst))
        out[:, ::2] = a_set
        return out


@torch.no_grad()
def bipartite_plan(metric: Tensor, r: int, protect_first: bool = True, protect_dst_first: bool = False) -> MergePlan:
    """ToMe's bipartite soft matching on ``metric`` (B, N, C): set A = even positions, set B = odd; every A
    token's best B match by cosine similarity; the ``r`` A tokens with the best matches merge.

    ``protect_first``: token 0 (CLS) is never merged away; ``protect_dst_first``: token 1 (a distillation token,
    the first of set B) never receives a merge. ``r`` is capped at half of the unprotected tokens. Kept A tokens
    stay in positional order when token 0 is protected (so CLS stays first), else in match order.
    """
    n = metric.shape[1]
    protected = int(protect_first) + int(protect_dst_first)
    r = max(0, min(int(r), (n - protected) // 2))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    if protect_first:
        similarity[:, 0, :] = -math.inf
    if protect_dst_first:
        similarity[:, :, 0] = -math.inf
    best, best_dst = similarity.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    src, unmerged = ranked[:, :r], ranked[:, r:]
    if protect_first:
        unmerged = unmerged.sort(dim=1).values
    return MergePlan(unmerged, src, best_dst.gather(1, src), n, protect_dst_first)


# ------------------------------------------------------------------------------------------------ reducers


class Reducer:
    """Base of the reducers: a token hook with serialisable settings."""

    kind: ClassVar[str] = ""
    point: str = "post_attn"
    needs: frozenset[str] = frozenset()

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def out_tokens(self, n: int) -> int:
        raise NotImplementedError

    def macs(self, n: int, head_dim: int) -> int:
        """Multiply-adds of matrix products the reducer itself runs on ``n`` tokens (for the cost model)."""
        return 0

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind")
        return f"{type(self).__name__}({settings})"


class EViTReducer(Reducer):
    """Keep the tokens the CLS token attends to most; fuse the others into one token (EViT).

    Of the ``N`` tokens after the ``protect`` leading ones (CLS; 2 for a distilled DeiT), the
    ``ceil(keep_rate * N)`` with the highest head-averaged attention from token 0 are kept, in their original
    order; with ``fuse`` the rest become one extra token, their sum weighted by that attention, appended last.
    A keep rate that keeps every token changes nothing. ``keep_rate`` may be changed between steps (the
    pruner's warm-up schedule); the value at saving is the one in the architecture description.
    """

    kind = "evit"

    @property
    def needs(self) -> frozenset[str]:
        # A keep rate of 1 reduces nothing and asks for nothing, so the block keeps its fused attention kernel
        # and computes exactly what the dense model does.
        return frozenset({"probs"}) if self.keep_rate < 1.0 else frozenset()

    def __init__(self, keep_rate: float, fuse: bool = True, protect: int = 1, point: str = "post_attn") -> None:
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ValueError(f"evit keep_rate must be in (0, 1], got {keep_rate}")
        if point not in POINTS[1:]:
            raise ValueError(f"evit runs after attention ({POINTS[1:]}), not at {point!r}")
        if int(protect) < 1:
            raise ValueError("evit needs the CLS token (protect >= 1): it ranks tokens by the CLS token's attention")
        self.keep_rate, self.fuse, self.protect, self.point = float(keep_rate), bool(fuse), int(protect), point

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "keep_rate": self.keep_rate, "fuse": self.fuse, "protect": self.protect,
                "point": self.point}  # fmt: skip

    def kept(self, n: int) -> int:
        """Tokens kept of ``n`` candidates (those after the protected ones)."""
        return min(n, math.ceil(self.keep_rate * n - 1e-9))

    def out_tokens(self, n: int) -> int:
        candidates = n - self.protect
        k = self.kept(candidates)
        if k >= candidates:
            return n
        return self.protect + k + int(self.fuse)

    def __call__(self, x: Tensor, state: TokenState, ctx: HookContext) -> tuple[Tensor, TokenState]:
        p = self.protect
        candidates = x.shape[1] - p
        k = self.kept(candidates)
        if k >= candidates:
            return x, state
        attn = ctx.probs[:, :, 0, p:].mean(dim=1)  # (B, N): how much CLS attends to each candidate
        keep = keep_topk(attn, k)
        index = torch.cat([torch.arange(p, device=x.device).expand(x.shape[0], p), keep + p], dim=1)
        out, new = gather_tokens(x, index), state.select(index)
        if not self.fuse:
            return out, new
        rest = complement(keep, candidates)
        fused = fuse_tokens(gather_tokens(x[:, p:], rest), attn.gather(1, rest))
        return torch.cat([out, fused], dim=1), _append_fused(new, state, rest + p)


def _append_fused(new: TokenState, old: TokenState, parts: Tensor) -> TokenState:
    """``new`` (after :meth:`TokenState.select`) with one more token at the end, fused from the tokens ``parts``
    (B, M) of ``old``: real if any part was, standing for all their sizes, at position -1."""
    mask = size = None
    if old.mask is not None:
        mask = torch.cat([new.mask, old.mask.gather(1, parts).amax(dim=1, keepdim=True)], dim=1)
    if old.size is not None:
        size = torch.cat([new.size, old.size.gather(1, parts).sum(dim=1, keepdim=True)], dim=1)
    positions = torch.cat([new.positions, new.positions.new_full((parts.shape[0], 1), -1)], dim=1)
    return new.replace(mask=mask, size=size, positions=positions)


class ToMeReducer(Reducer):
    """Merge ``r`` tokens by bipartite soft matching on the head-averaged keys (ToMe).

    Sizes are carried in the token state and merged tokens are size-weighted means; with ``prop_attn`` the
    following attention adds ``log(size)`` of each key. ``protect``: 1 keeps the CLS token out of the matching,
    2 also keeps a distillation token (token 1) from receiving merges. ``r`` is capped at half of the
    unprotected tokens; ``r = 0`` changes nothing.
    """

    kind = "tome"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"keys"}) if self.r > 0 else frozenset()

    def __init__(self, r: int, prop_attn: bool = True, protect: int = 1) -> None:
        if int(r) < 0:
            raise ValueError(f"tome r must be >= 0, got {r}")
        if int(protect) not in (0, 1, 2):
            raise ValueError(f"tome protect must be 0, 1 (CLS) or 2 (CLS and distillation token), got {protect}")
        self.r, self.prop_attn, self.protect = int(r), bool(prop_attn), int(protect)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "r": self.r, "prop_attn": self.prop_attn, "protect": self.protect}

    def out_tokens(self, n: int) -> int:
        return n - max(0, min(self.r, (n - self.protect) // 2))

    def macs(self, n: int, head_dim: int) -> int:
        # The cosine similarity of set A (ceil(n/2) tokens) against set B (floor(n/2)) over the averaged keys.
        return 0 if self.out_tokens(n) == n else math.ceil(n / 2) * (n // 2) * head_dim

    def __call__(self, x: Tensor, state: TokenState, ctx: HookContext) -> tuple[Tensor, TokenState]:
        if self.out_tokens(x.shape[1]) == x.shape[1]:
            return x, state
        plan = bipartite_plan(ctx.keys.mean(dim=1), self.r, self.protect >= 1, self.protect >= 2)
        x, size = plan.merge_weighted(x, state.size)
        mask = None if state.mask is None else plan.merge(state.mask[..., None].float(), "amax")[..., 0]
        positions = plan.positions(state.token_positions(ctx.keys[:, 0]))
        new = state.replace(mask=mask, size=size, positions=positions, prop_attn=self.prop_attn)
        return x, new


REDUCERS: dict[str, type[Reducer]] = {"evit": EViTReducer, "tome": ToMeReducer}


def build_reducer(spec: Mapping[str, Any], where: str = "") -> Reducer:
    """A reducer from its ``spec()`` (as stored in an architecture description)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in REDUCERS:
        raise ValueError(f"{where}unknown token reducer {kind!r}; known: {sorted(REDUCERS)}")
    try:
        return REDUCERS[kind](**spec)
    except TypeError as e:
        raise ValueError(f"{where}bad settings for the {kind} reducer: {e}") from None


def _hooked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "token_hooks", None), list)}


def reducer_specs(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """``{block path: [reducer spec, ...]}`` of every block that holds reducers (other hooks are not model code
    and are left out)."""
    out = {}
    for name, module in _hooked_modules(model).items():
        specs = [h.spec() for h in module.token_hooks if isinstance(h, Reducer)]
        if specs:
            out[name] = specs
    return out


def remove_reducers(model: nn.Module) -> None:
    for module in _hooked_modules(model).values():
        module.token_hooks[:] = [h for h in module.token_hooks if not isinstance(h, Reducer)]


def attach_reducers(model: nn.Module, specs: Mapping[str, Sequence[Mapping[str, Any]]], source: str = "") -> None:
    """Give the named blocks of ``model`` the reducers of ``specs`` (replacing any reducers they had)."""
    blocks = _hooked_modules(model)
    unknown = sorted(set(specs) - set(blocks))
    if unknown:
        raise ValueError(f"{source}: token reducers for {unknown[:3]}, which are not blocks of the model")
    remove_reducers(model)
    for name, items in specs.items():
        blocks[name].token_hooks.extend(build_reducer(s, f"{source}: {name}: ") for s in items)
