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
* :class:`PuMerReducer` (Cao, Paranjape, Hajishirzi, ACL 2023): in a single-stream model (text first), drop the
  image tokens the text attends to least, then merge the kept image tokens and the text tokens, each on their own,
  by bipartite matching with plain means and no sizes; merged text masks become fractional key weights
  (csarron/PuMer: src/pumer/model/vilt/vit_vilt.py, ``Block.forward``).
* :class:`MADTPReducer` (Cao et al., CVPR 2024): score the block input against alignment tokens shared by every
  reducing block of every tower (:class:`AlignmentTokens`, MADTP's ``space_dict``), then keep the tokens whose
  importance (:func:`madtp_importance`) clears a per-sample threshold set by a temperature
  (:func:`madtp_keep_count`) and fuse the rest into one importance-weighted token (double125/MADTP:
  models/vit.py ``Block.Reduce_token``, models/utils.py ``Query_model``).
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
    "AlignmentTokens",
    "EViTReducer",
    "MADTPReducer",
    "MergePlan",
    "PuMerReducer",
    "ToMeReducer",
    "attach_reducers",
    "bipartite_macs",
    "bipartite_plan",
    "build_reducer",
    "complement",
    "fuse_tokens",
    "gather_tokens",
    "keep_topk",
    "madtp_importance",
    "madtp_keep_count",
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
def bipartite_plan(
    metric: Tensor, r: int, protect_first: bool = True, protect_dst_first: bool = False, score: str = "cosine"
) -> MergePlan:
    """ToMe's bipartite soft matching on ``metric`` (B, N, C): set A = even positions, set B = odd; every A
    token's best B match by cosine similarity; the ``r`` A tokens with the best matches merge.

    ``protect_first``: token 0 (CLS) is never merged away; ``protect_dst_first``: token 1 (a distillation token,
    the first of set B) never receives a merge. ``r`` is capped at half of the unprotected tokens. Kept A tokens
    stay in positional order when token 0 is protected (so CLS stays first), else in match order.
    ``score="absdiff"`` matches by the smallest ``|a - b|`` of a scalar metric (B, N) instead (PuMer's ``diff``
    merge style, an ablation).
    """
    n = metric.shape[1]
    protected = int(protect_first) + int(protect_dst_first)
    r = max(0, min(int(r), (n - protected) // 2))
    if score == "absdiff":
        similarity = -(metric[:, ::2, None] - metric[:, None, 1::2]).abs()
    elif score == "cosine":
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    else:
        raise ValueError(f"unknown bipartite score {score!r}; choose cosine or absdiff")
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


def bipartite_macs(n: int, width: int) -> int:
    """Multiply-adds of one bipartite similarity on ``n`` tokens: set A (ceil(n/2)) against set B (floor(n/2))."""
    return math.ceil(n / 2) * (n // 2) * width


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
        return 0 if self.out_tokens(n) == n else bipartite_macs(n, head_dim)

    def __call__(self, x: Tensor, state: TokenState, ctx: HookContext) -> tuple[Tensor, TokenState]:
        if self.out_tokens(x.shape[1]) == x.shape[1]:
            return x, state
        plan = bipartite_plan(ctx.keys.mean(dim=1), self.r, self.protect >= 1, self.protect >= 2)
        x, size = plan.merge_weighted(x, state.size)
        mask = None if state.mask is None else plan.merge(state.mask[..., None].float(), "amax")[..., 0]
        positions = plan.positions(state.token_positions(ctx.keys[:, 0]))
        new = state.replace(mask=mask, size=size, positions=positions, prop_attn=self.prop_attn)
        return x, new


# ------------------------------------------------------------------------------------------------ PuMer

PUMER_SIM_METHODS = {"mean_head": "mean_head", "mh": "mean_head", "first_head": "first_head", "fh": "first_head",
                     "k_metric": "k_metric", "km": "k_metric"}  # fmt: skip
PUMER_MERGE_STYLES = ("tome", "tip", "diff")


class PuMerReducer(Reducer):
    """PuMer's text-informed pruning and modality-aware merging in one block of a single-stream model (spec
    pumer_vilt.md 2), after the attention residual and before the MLP; ``state.text_len`` splits text from image.

    With ``N`` image tokens and ``T`` text tokens (padded length) entering the block:

    1. prune: each image token's saliency is the attention the text rows give it (``sim_method``: ``mean_head``
       averages the heads, ``first_head`` reads head 0, ``k_metric`` uses text-key / image-key products), summed
       over *all* text rows and divided by the real text length; the ``max(N - round(prune_r * N), 1)`` most salient
       are kept in descending saliency (the image CLS is a candidate like any other);
    2. merge the kept image tokens by bipartite matching on the head-averaged keys, ``round(merge_r * N)`` of them
       (``N`` before pruning; capped at half), the first (most salient) protected; ``merge_style`` ``tome``: plain
       mean; ``tip``: keys weighted by saliency, sum; ``diff``: the closest saliencies, nothing protected, sum;
    3. merge ``round(merge_text * T)`` text tokens the same way (text [CLS] protected, pads take part) and the text
       mask by the same plan (means: a pad merged with a word gives 0.5);
    4. continue with ``[text, image]``, image mask ones; token sizes are not kept (no proportional attention).

    With ``prune_r = 0`` the block instead runs ToMe over the whole sequence with ``int(merge_r)`` tokens (the
    released code's global baseline); the text length is then left as it was, as there.
    """

    kind = "pumer"

    def __init__(
        self,
        prune_r: float,
        merge_r: float,
        merge_text: float,
        sim_method: str = "mean_head",
        merge_style: str = "tome",
    ) -> None:
        if sim_method not in PUMER_SIM_METHODS:
            raise ValueError(f"pumer sim_method must be one of {sorted(PUMER_SIM_METHODS)}, got {sim_method!r}")
        if merge_style not in PUMER_MERGE_STYLES:
            raise ValueError(f"pumer merge_style must be one of {PUMER_MERGE_STYLES}, got {merge_style!r}")
        for name, value in (("prune_r", prune_r), ("merge_text", merge_text)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"pumer {name} must be in [0, 1), got {value}")
        if float(merge_r) < 0:
            raise ValueError(f"pumer merge_r must be >= 0, got {merge_r}")
        self.prune_r, self.merge_r, self.merge_text = float(prune_r), float(merge_r), float(merge_text)
        self.sim_method, self.merge_style = PUMER_SIM_METHODS[sim_method], merge_style

    @property
    def needs(self) -> frozenset[str]:
        if self.prune_r > 0:
            return frozenset({"probs", "keys"})
        return frozenset({"keys"}) if int(self.merge_r) > 0 else frozenset()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "prune_r": self.prune_r, "merge_r": self.merge_r, "merge_text": self.merge_text,
                "sim_method": self.sim_method, "merge_style": self.merge_style}  # fmt: skip

    def _counts(self, t: int, n: int) -> tuple[int, int, int, int]:
        """(kept image tokens, image merges, text merges, tokens merged globally) for ``t`` text and ``n`` image
        tokens; Python's round (halves to even), as the released code."""
        if self.prune_r <= 0:
            total = t + n
            return n, 0, 0, max(0, min(int(self.merge_r), (total - 1) // 2))
        keep = max(n - round(self.prune_r * n), 1)
        cap = keep // 2 if self.merge_style == "diff" else (keep - 1) // 2
        r_img = max(0, min(round(self.merge_r * n), cap))
        r_txt = max(0, min(round(self.merge_text * t), (t - 1) // 2))
        return keep, r_img, r_txt, 0

    def out_split(self, t: int, n: int) -> tuple[int, int]:
        """(text, image) tokens leaving the block from ``t`` text and ``n`` image tokens."""
        keep, r_img, r_txt, r_all = self._counts(t, n)
        if r_all:  # the global baseline keeps the text length it had
            return t, n - r_all
        return t - r_txt, keep - r_img

    def split_macs(self, t: int, n: int, head_dim: int) -> int:
        """Multiply-adds of the matrix products the reducer runs (the bipartite similarities; ``k_metric``'s
        text-image key products) on ``t`` text and ``n`` image tokens."""
        keep, r_img, r_txt, r_all = self._counts(t, n)
        if r_all:
            return bipartite_macs(t + n, head_dim)
        macs = t * n * head_dim if self.sim_method == "k_metric" else 0
        if r_img and self.merge_style != "diff":
            macs += bipartite_macs(keep, head_dim)
        return macs + (bipartite_macs(t, head_dim) if r_txt else 0)

    def _saliency(self, probs: Tensor | None, keys: Tensor, t: int, n_text: Tensor) -> Tensor:
        if self.sim_method == "mean_head":
            scores = probs[:, :, :t, t:].mean(dim=1).sum(dim=1)
        elif self.sim_method == "first_head":
            scores = probs[:, 0, :t, t:].sum(dim=1)
        else:  # k_metric
            scores = (keys[:, :t] @ keys[:, t:].transpose(1, 2)).sum(dim=1)
        return scores / n_text

    def __call__(self, x: Tensor, state: TokenState, ctx: HookContext) -> tuple[Tensor, TokenState]:
        t = state.text_len
        if t is None:
            raise ValueError(f"block {ctx.block}: the pumer reducer needs a single-stream model (state.text_len)")
        n = x.shape[1] - t
        keep, r_img, r_txt, r_all = self._counts(t, n)
        if self.prune_r <= 0 and not r_all:
            return x, state
        keys = ctx.keys.mean(dim=1)  # (B, L, d): the merge metric
        mask = state.mask if state.mask is not None else x.new_ones(x.shape[:2])
        positions = state.token_positions(x)
        if r_all:  # the global ToMe baseline over text and image together
            plan = bipartite_plan(keys, r_all)
            merged_mask = plan.merge(mask[..., None].to(x.dtype), "mean")[..., 0]
            return plan.merge(x, "mean"), state.replace(
                mask=merged_mask, size=None, positions=plan.positions(positions)
            )
        text_mask = mask[:, :t].to(x.dtype)
        scores = self._saliency(ctx.probs, keys, t, text_mask.sum(dim=1, keepdim=True))
        top, index = scores.topk(keep, dim=1)  # descending saliency: the most salient kept token comes first
        image, metric = gather_tokens(x[:, t:], index), gather_tokens(keys[:, t:], index)
        image_pos = positions[:, t:].gather(1, index)
        if r_img:
            if self.merge_style == "diff":
                plan = bipartite_plan(top, r_img, protect_first=False, score="absdiff")
            elif self.merge_style == "tip":
                plan = bipartite_plan(metric * top[..., None], r_img)
            else:
                plan = bipartite_plan(metric, r_img)
            image = plan.merge(image, "mean" if self.merge_style == "tome" else "sum")
            image_pos = plan.positions(image_pos)
        text, text_pos = x[:, :t], positions[:, :t]
        if r_txt:
            plan = bipartite_plan(keys[:, :t], r_txt)
            text, text_pos = plan.merge(text, "mean"), plan.positions(text_pos)
            text_mask = plan.merge(text_mask[..., None], "mean")[..., 0]
        new_mask = torch.cat([text_mask, text_mask.new_ones(image.shape[:2])], dim=1)
        new = state.replace(
            mask=new_mask,
            size=None,
            positions=torch.cat([text_pos, image_pos], dim=1),
            text_len=text.shape[1],
            soft_mask=True,
        )
        return torch.cat([text, image], dim=1), new


# ------------------------------------------------------------------------------------------------ MADTP

_EPS = 1e-8  # the seed's guard in every normalisation


def madtp_importance(probs: Tensor, head_out: Tensor, match: Tensor) -> Tensor:
    """MADTP's token importance (B, N) of the N tokens after the first (spec madtp.md 3.1), the mean of:

    * the attention each token receives: the max over heads of ``probs`` (B, H, 1 + N, 1 + N), summed over the
      non-first queries, normalised over the tokens;
    * the first token's attention to it, each head weighted by the norm of its output at that token (``head_out``,
      (B, H, 1 + N, d), each head's context before the projection) over all heads' norms;
    * its best raw match with an alignment token (``match`` (B, N, M), unscaled dot products), normalised over the
      tokens.
    """
    s_self = probs[:, :, 1:, 1:].amax(dim=1).sum(dim=1)
    s_self = s_self / (s_self.sum(dim=1, keepdim=True) + _EPS)
    norms = head_out[:, :, 1:].norm(dim=-1)  # (B, H, N)
    weights = norms / (norms.sum(dim=1, keepdim=True) + _EPS)
    s_cls = (probs[:, :, 0, 1:] * weights).sum(dim=1)
    s_mag = match.amax(dim=-1)
    s_mag = s_mag / (s_mag.sum(dim=1, keepdim=True) + _EPS)
    return (s_self + s_cls + s_mag) / 3.0


def madtp_keep_count(importance: Tensor, match: Tensor, temperature: float) -> Tensor:
    """Per sample (B,), how many tokens clear MADTP's threshold (spec 3.2): each alignment token's softmax over the
    tokens of ``match / temperature`` (B, N, M) averages the ``importance`` (B, N); the threshold is the smallest of
    these averages. A larger temperature flattens the softmaxes, raises the threshold towards the mean importance
    and keeps fewer tokens."""
    attention = (match.float() / temperature).softmax(dim=1)  # (B, N, M): over the tokens
    average = (attention * importance.float()[..., None]).sum(dim=1)  # (B, M); elementwise, as the counted cost
    threshold = average.amin(dim=1, keepdim=True)
    return (importance > threshold).sum(dim=1)


class AlignmentTokens(nn.Module):
    """MADTP's alignment tokens: one (``num`` x ``dim``) matrix (the seed's ``space_dict``, initialised N(0, 1))
    read by every reducing block of every tower, momentum towers included, and, where token widths differ from
    ``dim`` (CLIP), one Linear per block (``q_maps``, keyed by tower and block) mapping tokens to ``dim``.

    While the module trains with gradients on, each encoder forward that reaches a :class:`MADTPReducer` leaves one
    record in :attr:`calls`: ``{"tower": path, "features": (B, num, dim)}``, the sum over its blocks of the tokens
    pooled by each alignment token (the seed's ``sd_img_ft_all`` / text features), from which MADTP's alignment loss
    is computed; the training side reads and clears it."""

    def __init__(self, num: int = 100, dim: int = 768) -> None:
        super().__init__()
        self.space_dict = nn.Parameter(torch.randn(num, dim))
        self.q_maps = nn.ModuleDict()
        self.calls: list[dict[str, Any]] = []

    @property
    def recording(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def q_map(self, key: str, in_dim: int) -> nn.Linear:
        """The projection of ``key`` (created Linear(in_dim, dim) on first use; attach before building the
        optimizer, and before loading a state dict that holds it)."""
        if key not in self.q_maps:
            self.q_maps[key] = nn.Linear(in_dim, self.space_dict.shape[1]).to(self.space_dict.device)
        linear = self.q_maps[key]
        if linear.in_features != in_dim:
            raise ValueError(f"alignment projection {key} maps {linear.in_features} features, not {in_dim}")
        return linear


class MADTPReducer(Reducer):
    """MADTP's dynamic token pruning in one block (spec madtp.md 1-3).

    At ``pre_attn`` the tokens after the first (the block input, through the block's ``q_map`` when it has one) are
    matched with the alignment tokens: ``match = q @ space_dict.T`` (B, N, M); at ``point`` (after the attention
    residual in a ViT or CLIP block, after the self-attention in a BERT layer) :func:`madtp_importance` and
    :func:`madtp_keep_count` decide ``K``, the batch's largest count: every sample keeps its ``K`` most important
    tokens, in their original order, and the others are fused into one token appended last, their mean weighted by
    importance. The layer passes its tokens through when ``K <= max_keep`` or fewer than two would be fused; with
    ``keep_marked`` the tokens at the positions ``state.scratch["keep_positions"]`` (B,) (CLIP's end-of-text token)
    are always kept and the limit becomes the largest such input position + 2 (the seed's CLIP text rule). A
    temperature of 0 switches the block off (the dense computation, nothing matched).

    The token count depends on the input: the cost model reads it from a forward's recorded counts.
    """

    kind = "madtp"

    def __init__(
        self,
        temperature: float,
        point: str = "post_attn",
        max_keep: int = 0,
        keep_marked: bool = False,
        q_map: str | None = None,
        in_dim: int | None = None,
        sd_num: int = 100,
        sd_dim: int = 768,
    ) -> None:
        if float(temperature) < 0:
            raise ValueError(f"madtp temperature must be >= 0 (0: off), got {temperature}")
        if point not in POINTS[1:]:
            raise ValueError(f"madtp prunes after attention ({POINTS[1:]}), not at {point!r}")
        if q_map is not None and in_dim is None:
            raise ValueError("a madtp q_map needs in_dim, the width of the tokens it maps")
        self.temperature, self.point, self.max_keep = float(temperature), point, int(max_keep)
        self.keep_marked, self.q_map, self.in_dim = bool(keep_marked), q_map, in_dim
        self.sd_num, self.sd_dim = int(sd_num), int(sd_dim)
        self.align: AlignmentTokens | None = None
        self.tower = ""

    @property
    def active(self) -> bool:
        return self.temperature > 0

    @property
    def also_at(self) -> tuple[str, ...]:
        return ("pre_attn",) if self.active else ()

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"probs", "head_out"}) if self.active else frozenset()

    @property
    def out_tokens(self):
        # Off, the block keeps its tokens (a static schedule); on, only a forward knows (None: see models.cost).
        return None if self.active else (lambda n: n)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "temperature": self.temperature, "point": self.point, "max_keep": self.max_keep,
                "keep_marked": self.keep_marked, "q_map": self.q_map, "in_dim": self.in_dim, "sd_num": self.sd_num,
                "sd_dim": self.sd_dim}  # fmt: skip

    def bind(self, model: nn.Module, block_path: str = "") -> None:
        """Reach the model's :class:`AlignmentTokens` (``model.madtp``, created when missing) and this block's
        projection; ``block_path`` names the tower in the alignment records."""
        align = getattr(model, "madtp", None)
        if align is None:
            align = AlignmentTokens(self.sd_num, self.sd_dim)
            model.madtp = align
        if tuple(align.space_dict.shape) != (self.sd_num, self.sd_dim):
            raise ValueError(
                f"madtp reducer of {block_path or 'a block'} expects {self.sd_num} x {self.sd_dim} alignment tokens, "
                f"the model has {tuple(align.space_dict.shape)}"
            )
        if self.q_map is not None:
            align.q_map(self.q_map, self.in_dim)
        self.align = align
        self.tower = block_path.rsplit(".", 2)[0] if block_path else ""

    def macs(self, n: int, head_dim: int) -> int:
        """The match of ``n - 1`` tokens with the alignment tokens, and their projection (inference; the pooled
        features exist only in training)."""
        if not self.active:
            return 0
        rows = n - 1
        return rows * self.sd_num * self.sd_dim + (rows * self.in_dim * self.sd_dim if self.q_map else 0)

    def _match(self, x: Tensor, state: TokenState, ctx: HookContext) -> None:
        align = self.align
        if align is None:
            raise RuntimeError("a MADTPReducer must be bound to its model (bind) before it runs")
        q = x[:, 1:]
        if self.q_map is not None:
            q = align.q_maps[self.q_map](q)
        sd = align.space_dict.to(q.dtype)
        match = torch.matmul(q, sd.t())  # (B, N, M), unscaled
        state.scratch[f"madtp_match{ctx.block}"] = match
        if align.recording:
            pool = (match / math.sqrt(self.sd_dim)).softmax(dim=1)
            pooled = torch.matmul(pool.transpose(1, 2), q)  # (B, M, dim)
            record = state.scratch.get("madtp_record")
            if record is None:  # the first reducing block of this encoder forward
                record = {"tower": self.tower, "features": pooled}
                state.scratch["madtp_record"] = record
                align.calls.append(record)
            else:
                record["features"] = record["features"] + pooled

    def __call__(self, x: Tensor, state: TokenState, ctx: HookContext) -> tuple[Tensor, TokenState]:
        if not self.active:
            return x, state
        if ctx.point == "pre_attn":
            self._match(x, state, ctx)
            return x, state
        match = state.scratch.pop(f"madtp_match{ctx.block}")
        importance = madtp_importance(ctx.probs, ctx.head_out, match)
        n = importance.shape[1]
        k = int(madtp_keep_count(importance, match, self.temperature).max())
        limit, rank = self.max_keep, importance
        if self.keep_marked:
            marked = state.token_positions(x)[:, 1:] == state.scratch["keep_positions"][:, None]
            if not bool(marked.any(dim=1).all()):
                raise ValueError("madtp: a marked token (CLIP's end of text) is no longer among the tokens")
            # The seed's CLIP text rule, in input positions: the largest end-of-text position + 2, in every layer.
            limit = max(limit, int(state.scratch["keep_positions"].max()) + 2)
            rank = importance.masked_fill(marked, math.inf)
        if k < 1 or k <= limit or n - k <= 1:
            return x, state
        keep = keep_topk(rank, k)
        rest = complement(keep, n)
        first = torch.zeros(x.shape[0], 1, dtype=keep.dtype, device=x.device)
        index = torch.cat([first, keep + 1], dim=1)
        weights = importance.gather(1, rest)
        weights = weights / (weights.sum(dim=1, keepdim=True) + _EPS)
        fused = fuse_tokens(gather_tokens(x[:, 1:], rest), weights)
        out = torch.cat([gather_tokens(x, index), fused], dim=1)
        return out, _append_fused(state.select(index), state, rest + 1)


REDUCERS: dict[str, type[Reducer]] = {
    "evit": EViTReducer,
    "tome": ToMeReducer,
    "madtp": MADTPReducer,
    "pumer": PuMerReducer,
}


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
        for spec in items:
            reducer = build_reducer(spec, f"{source}: {name}: ")
            if hasattr(reducer, "bind"):  # a reducer with weights in the model (MADTP's alignment tokens)
                reducer.bind(model, name)
            blocks[name].token_hooks.append(reducer)
