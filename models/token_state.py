"""The token state: what an encoder knows about its current tokens besides their features, and the hooks that
change both.

Every encoder (ViT, MED text transformer, and the backbones after them) starts a :class:`TokenState` for its
input, hands it to every block together with the features, and gets it back from each block; whatever consumes
the encoder's output takes the state with it (the image tokens' padding mask for cross-attention, the
question's mask for VQA's answer decoder, the positions for pooling). A block never keeps state between calls.

Blocks call their token hooks at three points, the same in every block type (:data:`POINTS`):

* ``pre_attn``: the block input, before attention (MADTP scores it);
* ``post_self_attn``: after the self-attention sub-layer; in a text layer with cross-attention this is before
  the cross-attention (MADTP prunes text here), elsewhere it is the same place as ``post_attn``;
* ``post_attn``: after all attention residuals, before the MLP (EViT, ToMe, PuMer, MADTP on images).

A hook is any callable ``hook(x, state, ctx) -> (x, state)`` with two attributes: ``point`` (one of
:data:`POINTS`) and ``needs`` (a subset of :data:`NEEDS`: what the block must hand it in ``ctx``: the
self-attention probabilities, keys, or each head's output before the projection). A hook may also observe
earlier points of the block (``also_at``, e.g. MADTP scores the block input at ``pre_attn`` and reduces after
attention); it is called there too, with ``ctx.point`` saying where, and must not change the tokens there. A hook
that drops, fuses or merges tokens returns features and a state of the new length; :func:`run_hooks` checks that
they agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "MASK_VALUE",
    "NEEDS",
    "POINTS",
    "HookContext",
    "KeyWeights",
    "TokenHook",
    "TokenState",
    "check_hooks",
    "extended_attention_mask",
    "hooks_need",
    "run_hooks",
]

# BERT's additive mask value (not -inf): a fully padded row still gets a finite softmax.
MASK_VALUE = -10000.0
POINTS = ("pre_attn", "post_self_attn", "post_attn")
NEEDS = frozenset({"probs", "keys", "head_out"})


def extended_attention_mask(
    mask: Tensor | None,
    batch: int,
    length: int,
    past: int = 0,
    is_decoder: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor | None:
    """Additive self-attention mask for ``length`` new tokens after ``past`` cached ones.

    ``mask`` is a 0/1 padding mask over all ``past + length`` keys (B, past + length), or a full
    (B, length, past + length) mask used as given. Decoders multiply the padding mask by a causal
    mask in which every query also sees the whole cached prefix. Returns (B, 1, Tq, Tk) or
    (B, 1, 1, Tk), or ``None`` when nothing is masked.
    """
    total = past + length
    if mask is None:
        if not is_decoder:
            return None
        mask = torch.ones(batch, total, device=device)
    if mask.dim() == 3:
        keep = mask[:, None].to(dtype)
    elif mask.dim() == 2:
        if mask.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} positions but there are {total} ({past} cached + {length} new)"
            )
        keep = mask[:, None, None, :].to(dtype)
        if is_decoder:
            keys = torch.arange(total, device=mask.device)
            queries = torch.arange(past, total, device=mask.device)
            causal = (keys[None, :] <= queries[:, None]).to(dtype)
            keep = causal[None, None] * keep
    else:
        raise ValueError(f"attention_mask must be (B, T) or (B, Tq, Tk), got shape {tuple(mask.shape)}")
    return (1.0 - keep) * MASK_VALUE


@dataclass(eq=False)
class KeyWeights:
    """PuMer's multiplicative attention mask (csarron/PuMer: src/pumer/model/common.py, spec pumer_vilt.md 2.6), in
    place of an additive bias: each key's exponentiated score is multiplied by its weight (B, Tk) (0/1 padding,
    fractional for merged text), a query always keeps its own key (the diagonal weight is raised to 1), and the
    normalisation is smoothed, ``(e * w + eps / Tk) / (sum(e * w) + eps)``. Used in every layer of a PuMer model."""

    weights: Tensor
    eps: float = 1e-6

    def probs(self, scores: Tensor) -> Tensor:
        """Attention probabilities from raw scores (B, H, Tq, Tk), computed in float32 as PuMer does."""
        tq, tk = scores.shape[-2:]
        w = self.weights.to(torch.float32)[:, None, None, :]
        eye = torch.eye(tq, tk, dtype=torch.float32, device=scores.device)
        w = w + (1.0 - w) * eye
        # The max only stabilises the exponent (the result depends on it through eps alone): no gradient through it.
        e = (scores - scores.detach().amax(dim=-1, keepdim=True)).to(torch.float32).exp() * w
        return ((e + self.eps / tk) / (e.sum(dim=-1, keepdim=True) + self.eps)).to(scores.dtype)


@dataclass(eq=False)
class TokenState:
    """The current tokens of one encoder forward pass, besides their features.

    Per-token fields are ``None`` while they hold their trivial value, so an unreduced model pays nothing:

    * ``mask`` (B, T): key-padding weights, 1 for a real token and 0 for padding; fractional values (PuMer's
      merged text) are soft key weights when ``soft_mask`` is set. ``None``: every token is real.
    * ``size`` (B, T): how many input tokens each token stands for after merging (ToMe). ``None``: all 1.
      With ``prop_attn`` attention adds ``log(size)`` of each key to the logits.
    * ``positions`` (B, T) long: each token's index in the encoder's input (-1 for a token fused from several);
      reducers keep kept tokens in ascending order, so CLIP can still pool at its EOT token. ``None``: 0..T-1.

    ``masked_softmax`` is ``"additive"`` (padding as a large negative bias, fractional weights as ``log`` biases) or
    ``"pumer"`` (:class:`KeyWeights`, PuMer's multiplicative masked softmax, in every layer of a PuMer model).
    ``text_len`` splits a single-stream sequence (ViLT: text first, then image); ``causal`` and ``past`` make
    the self-attention causal over ``past`` cached tokens (decoders). ``record`` names blocks whose attention
    probabilities are kept in ``maps`` / ``cross_maps`` (BLIP's Grad-CAM hooks). ``counts`` records, per
    block index, the tokens entering it, leaving its self-attention sub-layer and reaching its MLP: what the
    analytic cost model needs for a dynamic token schedule. ``scratch`` is where the hooks of one block pass
    data from one point to the next.
    """

    mask: Tensor | None = None
    size: Tensor | None = None
    positions: Tensor | None = None
    soft_mask: bool = False
    prop_attn: bool = False
    masked_softmax: str = "additive"
    text_len: int | None = None
    causal: bool = False
    past: int = 0
    record: frozenset[int] = frozenset()
    maps: dict[int, Tensor] = field(default_factory=dict)
    cross_maps: dict[int, Any] = field(default_factory=dict)
    counts: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        mask: Tensor | None = None,
        *,
        causal: bool = False,
        past: int = 0,
        record: Iterable[int] = (),
        text_len: int | None = None,
    ) -> TokenState:
        """The state of an encoder's input: ``mask`` (B, T) 0/1 padding (or None)."""
        return cls(mask=mask, causal=causal, past=past, record=frozenset(record), text_len=text_len)

    def replace(self, **changes: Any) -> TokenState:
        """A copy with ``changes``; the per-forward records (maps, counts, scratch) are shared, not copied."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------- per-token fields
    def padding_mask(self, x: Tensor) -> Tensor:
        """``mask`` as a (B, T) long 0/1 tensor for the tokens ``x`` (all ones when unset); for consumers such as
        cross-attention, which take BERT-style padding masks."""
        if self.mask is None:
            return torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return (self.mask > 0).long() if self.soft_mask else self.mask.long()

    def token_positions(self, x: Tensor) -> Tensor:
        """``positions`` for the tokens ``x`` (B, T, ...), materialised (B, T)."""
        if self.positions is not None:
            return self.positions
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)

    def select(self, index: Tensor) -> TokenState:
        """The state of the tokens ``index`` (B, K) (long, into the current tokens), in that order."""
        return self.replace(
            mask=None if self.mask is None else self.mask.gather(1, index),
            size=None if self.size is None else self.size.gather(1, index),
            positions=index if self.positions is None else self.positions.gather(1, index),
        )

    def check(self, x: Tensor, where: str = "") -> None:
        """Every per-token field covers exactly the tokens of ``x``."""
        length = x.shape[1]
        for name in ("mask", "size", "positions"):
            value = getattr(self, name)
            if value is None or value.dim() != 2:  # a full (B, Tq, Tk) attention mask is the caller's own
                continue
            if tuple(value.shape) != (x.shape[0], length + (self.past if name == "mask" else 0)):
                raise ValueError(
                    f"{where}token state {name} has shape {tuple(value.shape)} but there are "
                    f"{x.shape[0]} x {length} tokens; a hook that changes the tokens must update the state with them"
                )

    # ---------------------------------------------------------------------------------------- attention
    def attn_bias(self, x: Tensor) -> Tensor | KeyWeights | None:
        """The additive self-attention bias for the tokens ``x`` (B, T, D): padding (or soft key weights),
        causality over the cache, and ``log(size)`` under proportional attention; ``None`` when nothing applies
        (the fused kernel then runs unmasked)."""
        batch, length = x.shape[:2]
        if self.masked_softmax == "pumer":
            if self.causal or (self.prop_attn and self.size is not None):
                raise ValueError("PuMer's masked softmax takes no causal mask or proportional attention")
            weights = x.new_ones(batch, length) if self.mask is None else self.mask
            return KeyWeights(weights)
        if self.causal:
            bias = extended_attention_mask(self.mask, batch, length, self.past, True, x.dtype, x.device)
        elif self.mask is None:
            bias = None
        elif self.soft_mask:
            m = self.mask.to(x.dtype)
            bias = torch.where(m > 0, m.clamp_min(torch.finfo(x.dtype).tiny).log(), MASK_VALUE)[:, None, None, :]
        else:
            bias = extended_attention_mask(self.mask, batch, length, 0, False, x.dtype, x.device)
        if self.prop_attn and self.size is not None:
            log_size = self.size.to(x.dtype).log()[:, None, None, :]
            bias = log_size if bias is None else bias + log_size
        return bias


@dataclass
class HookContext:
    """What a block hands its hooks at one point: its index and, when a hook there asked for them, the
    self-attention probabilities (B, H, T, T), keys (B, H, T, d) and each head's output before the
    projection (B, H, T, d), of the tokens that entered the attention; ``cross_probs`` in text layers."""

    block: int
    point: str
    probs: Tensor | None = None
    keys: Tensor | None = None
    head_out: Tensor | None = None
    cross_probs: Any = None


class TokenHook(Protocol):
    point: str
    needs: frozenset[str]

    def __call__(self, x: Tensor, state: TokenState, ctx: HookContext) -> tuple[Tensor, TokenState]: ...


def hooks_need(hooks: Sequence[TokenHook], what: str, points: Iterable[str] = POINTS) -> bool:
    """Whether a hook at one of ``points`` asked for ``what`` (one of :data:`NEEDS`)."""
    points = tuple(points)
    return any(what in getattr(h, "needs", ()) for h in hooks if h.point in points)


def run_hooks(
    hooks: Sequence[TokenHook], point: str, x: Tensor, state: TokenState, ctx: HookContext
) -> tuple[Tensor, TokenState]:
    """Run the hooks registered at ``point``, in order, and check that each returns a consistent state (the first
    point of a block also checks that every hook names a known point and asks only for what blocks give)."""
    if point == POINTS[0]:
        check_hooks(hooks, f"block {ctx.block}: ")
    for hook in hooks:
        if hook.point != point and point not in getattr(hook, "also_at", ()):
            continue
        x, state = hook(x, state, ctx)
        state.check(x, f"block {ctx.block}, {point}: ")
    return x, state


def check_hooks(hooks: Sequence[Any], owner: str = "") -> list[Any]:
    """``hooks`` as a list, each with a known ``point`` and ``needs``."""
    hooks = list(hooks)
    for hook in hooks:
        point = getattr(hook, "point", None)
        if point not in POINTS:
            raise ValueError(f"{owner}token hook {hook!r} has point {point!r}; expected one of {POINTS}")
        also = set(getattr(hook, "also_at", ())) - set(POINTS)
        if also:
            raise ValueError(f"{owner}token hook {hook!r} also observes unknown points {sorted(also)}")
        unknown = set(getattr(hook, "needs", ())) - NEEDS
        if unknown:
            raise ValueError(f"{owner}token hook {hook!r} needs {sorted(unknown)}; a block can give {sorted(NEEDS)}")
    return hooks
