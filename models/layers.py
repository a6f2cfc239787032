"""Prunable transformer building blocks shared by every backbone.

Every backbone (BLIP's ViT and BERT, CLIP, ViLT, DeiT) is assembled from :class:`Attention`,
:class:`Mlp` and :class:`Block`. They offer pruners three seams and nothing else:

* **Mask slots** (``Attention.head_dim_mask``, ``Attention.head_mask``, ``Mlp.neuron_mask``): ``None``
  means off; a 1-D tensor multiplies the matching activation. Slots are plain attributes, never
  registered: assigning an ``nn.Parameter`` to a slot does *not* add it to the module's parameters or
  state dict. The pruner that sets a mask owns it (creates it on the right device, lists it in its own
  ``parameters()``/``state_dict()``, all-reduces its gradient under DDP); ``model.to()`` and
  ``copy.deepcopy`` treat it as an ordinary Python attribute. A dense model's state dict therefore
  never contains masks.
* **Physical slicing** (``keep_head_dims``, ``keep_heads``, ``keep_neurons``): replaces the weights of
  the affected Linear layers in place by the kept rows/columns (biases included), so a compressed
  model is an ordinary model with other widths.
* **Token hooks** (``Block.token_hooks``): callables run at the three points of :mod:`models.token_state`
  (before attention, after self-attention, after the attention residual and before the MLP), where token
  scoring, pruning and merging happen; the block passes its :class:`~models.token_state.TokenState` through
  them and returns it.

:func:`module_units` describes what can be pruned as a list of :class:`Unit`; pruners consume that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .token_state import HookContext, KeyWeights, TokenHook, TokenState, hooks_need, run_hooks

__all__ = [
    "Attention",
    "AttentionOutput",
    "Block",
    "KVCache",
    "Mlp",
    "QuickGELU",
    "SkippedBlock",
    "Unit",
    "attention",
    "module_units",
    "slice_linear",
]

IndexLike = Tensor | Sequence[int] | Sequence[bool]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | KeyWeights | None = None,
    scale: float | None = None,
    need_probs: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over ``(B, H, T, d)`` tensors.

    ``mask`` is *additive* (0 to attend, a large negative number or ``-inf`` to block) and must
    broadcast to ``(B, H, Tq, Tk)``, or :class:`~models.token_state.KeyWeights` (PuMer's multiplicative
    masked softmax, always computed explicitly). ``scale`` defaults to ``d ** -0.5``. Returns the context
    ``(B, H, Tq, d)`` and, only when ``need_probs``, the attention probabilities (before dropout);
    otherwise the fused SDPA kernel runs and no probabilities exist.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if isinstance(mask, KeyWeights):
        probs = mask.probs(torch.matmul(q * scale, k.transpose(-2, -1)))
        dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
        return torch.matmul(dropped, v), probs if need_probs else None
    if mask is not None:
        if mask.dtype == torch.bool:
            raise TypeError("attention mask must be additive (float), not boolean")
        mask = mask.to(q.dtype)
    if not need_probs:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return ctx, None
    # The scale on q (B, H, T, d), not on the (B, H, T, T) scores: one pass less over the largest tensor (timm's order).
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(dropped, v), probs


def checkpoint_last_blocks(blocks: Sequence[nn.Module], enable: bool = True, last_k: int | None = None) -> None:
    """Checkpoint the last ``last_k`` of ``blocks`` (all when ``None``), as BLIP's ``vit_ckpt_layer``."""
    first = 0 if last_k is None else len(blocks) - last_k
    for i, block in enumerate(blocks):
        block.grad_checkpointing = enable and i >= first


def sliced_mask(mask: Tensor | None, keep: Tensor) -> Tensor | None:
    """A mask slot cut down to the kept entries (detached: a pruner that still trains it sets it again)."""
    return None if mask is None else mask.detach()[keep.to(mask.device)].clone()


def slice_linear(linear: nn.Linear, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> None:
    """Keep only the rows ``out_idx`` (and their bias entries) and columns ``in_idx`` of ``linear``.

    The Linear keeps its identity, so hooks and parent references survive; its Parameters are new
    objects, so any optimizer must be rebuilt afterwards.
    """
    with torch.no_grad():
        weight = linear.weight
        if out_idx is not None:
            weight = weight.index_select(0, out_idx.to(weight.device))
        if in_idx is not None:
            weight = weight.index_select(1, in_idx.to(weight.device))
        bias = linear.bias
        if bias is not None and out_idx is not None:
            bias = bias.index_select(0, out_idx.to(bias.device))
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _as_index(idx: IndexLike, size: int, what: str) -> Tensor:
    """Sorted unique LongTensor of kept positions from integer indices or a boolean keep-vector."""
    t = idx if isinstance(idx, Tensor) else torch.as_tensor(idx)
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        if t.shape != (size,):
            raise ValueError(f"boolean keep-vector for {what}s must have length {size}, got shape {tuple(t.shape)}")
        t = t.nonzero().flatten()
    else:
        t = t.flatten().long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
            raise IndexError(f"{what} index out of range for size {size}: {t.tolist()}")
        unique = torch.unique(t)
        if unique.numel() != t.numel():
            raise ValueError(f"duplicate {what} indices: {t.tolist()}")
        t = unique
    if t.numel() == 0:
        raise ValueError(f"cannot remove every {what}; keep at least one")
    return t


def _grouped_rows(heads: Tensor, dims: Tensor, num_heads: int, head_dim: int, groups: int) -> Tensor:
    """Row indices of a projection laid out as (group, head, dim), e.g. fused qkv with groups=3."""
    offsets = torch.arange(groups)[:, None, None] * (num_heads * head_dim)
    return (offsets + heads[None, :, None] * head_dim + dims[None, None, :]).flatten()


class _SlotModule(nn.Module):
    """Module whose slot attributes bypass ``nn.Module`` registration.

    ``_slots`` maps a slot name to the attribute holding its required length (``None``: any object).
    Without this, a pruner assigning an ``nn.Parameter`` mask or an ``nn.Module`` hook would silently
    add pruner state to the model's parameters and state dict.
    """

    _slots: ClassVar[dict[str, str | None]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._slots:
            super().__setattr__(name, value)
            return
        length_attr = self._slots[name]
        if length_attr is not None and value is not None:
            if not isinstance(value, Tensor):
                raise TypeError(f"{type(self).__name__}.{name} must be a tensor or None, got {type(value).__name__}")
            expected = getattr(self, length_attr)
            if tuple(value.shape) != (expected,):
                raise ValueError(
                    f"{type(self).__name__}.{name} must have shape ({expected},) to match {length_attr}={expected}, "
                    f"got {tuple(value.shape)}"
                )
        object.__setattr__(self, name, value)


class KVCache:
    """Keys and values carried between incremental decoding steps, stored after masking.

    Self-attention appends the new step's keys/values; cross-attention computes them from the context
    once and reuses them afterwards.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None


class AttentionOutput(NamedTuple):
    out: Tensor
    probs: Tensor | None
    keys: Tensor | None
    head_out: Tensor | None = None


class Attention(_SlotModule):
    """Multi-head attention with per-instance head count and head width.

    Layouts (chosen so official checkpoints load without key maps):

    * ``fused=True``: one ``qkv`` Linear(dim, 3*H*d), rows ordered (q/k/v, head, dim): timm ViT style.
      Self-attention only.
    * ``fused=False``: ``query`` Linear(dim, H*d) and ``key``/``value`` Linear(kv_dim, H*d), rows
      ordered (head, dim): BERT style; required for cross-attention.

    ``proj`` (Linear(H*d, out_dim or dim)) exists only when ``proj=True``; BERT keeps its output
    projection outside the attention module, so there ``keep_head_dims``/``keep_heads`` return the
    column indices the caller must keep in it.

    ``scale`` is fixed at construction (``head_dim ** -0.5`` unless given) and survives slicing unless
    ``keep_head_dims(..., rescale=True)``: timm ViTs (BLIP, DeiT) keep ``64 ** -0.5`` after UPop
    compression, BERT and CLIP recompute it from the kept width. ``slice_rescale`` is what
    ``keep_head_dims`` does when not told (False; CLIP's blocks set True, the convention of the UPop seed's
    released CLIP files).

    Mask slots: ``head_dim_mask`` (shape ``(head_dim,)``) multiplies coordinate ``i`` of every head's
    query, key and value before the scores (UPop); ``head_mask`` (shape ``(num_heads,)``) multiplies
    each head's context (head pruning).

    Uneven value widths (``value_dims``, one per head, each at most ``head_dim``; UVC prunes value
    coordinates inside each head): queries and keys keep ``head_dim``, the value rows and the projection's
    input columns are the per-head widths laid head after head. The heads' values are zero-padded to
    ``head_dim`` for one fused attention call and the padding is dropped before the projection, so the
    projection and the value Linear run at the reduced width and the attention product at the padded one.
    """

    _slots: ClassVar[dict[str, str | None]] = {"head_dim_mask": "head_dim", "head_mask": "num_heads"}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        qkv_bias: bool = True,
        fused: bool = True,
        proj: bool = True,
        out_dim: int | None = None,
        proj_bias: bool = True,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim")
            head_dim = dim // num_heads
        kv_dim = dim if kv_dim is None else kv_dim
        if fused and kv_dim != dim:
            raise ValueError("the fused qkv layout serves self-attention only; use fused=False for cross-attention")
        self.dim = dim
        self.kv_dim = kv_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv_bias = qkv_bias
        self.fused = fused
        self.scale = float(head_dim**-0.5 if scale is None else scale)
        self.attn_drop = attn_drop
        inner = num_heads * head_dim
        if fused:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.query = nn.Linear(dim, inner, bias=qkv_bias)
            self.key = nn.Linear(kv_dim, inner, bias=qkv_bias)
            self.value = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias) if proj else None
        self.proj_drop = nn.Dropout(proj_drop)
        self.head_dim_mask: Tensor | None = None
        self.head_mask: Tensor | None = None
        self.value_dims: list[int] | None = None
        self.slice_rescale = False

    @property
    def inner_dim(self) -> int:
        """Width of the query / key projections (heads x head width)."""
        return self.num_heads * self.head_dim

    @property
    def value_inner_dim(self) -> int:
        """Width of the value projection and of the context the output projection reads."""
        return self.inner_dim if self.value_dims is None else sum(self.value_dims)

    def _split_heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _split_values(self, t: Tensor) -> Tensor:
        """Values (B, T, value width) as (B, H, T, head_dim), uneven heads zero-padded."""
        if self.value_dims is None:
            return self._split_heads(t)
        b, n = t.shape[:2]
        width = self.value_dims[0]
        if all(w == width for w in self.value_dims):  # one width: a single padded copy
            return F.pad(t.view(b, n, self.num_heads, width).transpose(1, 2), (0, self.head_dim - width))
        heads = t.split(self.value_dims, dim=-1)
        padded = [F.pad(h, (0, self.head_dim - h.shape[-1])) for h in heads]
        return torch.stack(padded, dim=1)

    def _merge_values(self, ctx: Tensor) -> Tensor:
        """The context (B, H, T, head_dim) as (B, T, value width), the padding of uneven heads dropped."""
        b, _, n, _ = ctx.shape
        if self.value_dims is None:
            return ctx.transpose(1, 2).reshape(b, n, self.inner_dim)
        width = self.value_dims[0]
        if all(w == width for w in self.value_dims):
            return ctx[..., :width].transpose(1, 2).reshape(b, n, self.num_heads * width)
        return torch.cat([ctx[:, h, :, :w] for h, w in enumerate(self.value_dims)], dim=-1)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        need_probs: bool = False,
        need_keys: bool = False,
        kv_cache: KVCache | None = None,
        need_head_out: bool = False,
    ) -> Tensor | AttentionOutput:
        """Attend from ``x`` (B, Tq, dim) to itself or to ``context`` (B, Tk, kv_dim).

        ``mask`` is additive, broadcastable to (B, H, Tq, Tk). Returns the output (B, Tq, out) (after
        ``proj`` if present). When ``need_probs``, ``need_keys`` or ``need_head_out`` is set it returns an
        :class:`AttentionOutput` instead, with the probabilities (B, H, Tq, Tk), the masked keys (B, H, Tk, d)
        and/or each head's context before the projection (B, H, Tq, d); unrequested fields are ``None``.
        Nothing is stored on the module, so the call is safe under activation checkpointing.
        """
        B, T, _ = x.shape
        cross = context is not None
        reuse_cached = cross and kv_cache is not None and kv_cache.k is not None
        k = v = None
        if self.fused:
            if cross:
                raise ValueError("the fused qkv layout cannot attend to a context; build with fused=False")
            if self.value_dims is None:
                qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
            else:
                q, k, v = self.qkv(x).split([self.inner_dim, self.inner_dim, self.value_inner_dim], dim=-1)
                q, k, v = self._split_heads(q), self._split_heads(k), self._split_values(v)
        else:
            q = self._split_heads(self.query(x))
            if not reuse_cached:
                source = context if cross else x
                k = self._split_heads(self.key(source))
                v = self._split_values(self.value(source))

        if self.head_dim_mask is not None:
            m = self.head_dim_mask.to(q.dtype)
            q = q * m
            if k is not None:
                k, v = k * m, v * m

        if kv_cache is not None:
            if reuse_cached:
                k, v = kv_cache.k, kv_cache.v
            elif not cross and kv_cache.k is not None:
                k = torch.cat([kv_cache.k, k], dim=2)
                v = torch.cat([kv_cache.v, v], dim=2)
            kv_cache.k, kv_cache.v = k, v

        dropout_p = self.attn_drop if self.training else 0.0
        ctx, probs = attention(q, k, v, mask, self.scale, need_probs, dropout_p)
        if self.head_mask is not None:
            ctx = ctx * self.head_mask.to(ctx.dtype).view(1, -1, 1, 1)
        out = self._merge_values(ctx)
        if self.proj is not None:
            out = self.proj_drop(self.proj(out))
        if need_probs or need_keys or need_head_out:
            return AttentionOutput(out, probs, k if need_keys else None, ctx if need_head_out else None)
        return out

    def _slice(self, heads: Tensor, dims: Tensor) -> Tensor:
        if self.value_dims is not None:
            raise ValueError("cannot slice whole head widths of an attention with uneven value widths")
        cols = _grouped_rows(heads, dims, self.num_heads, self.head_dim, 1)
        if self.fused:
            slice_linear(self.qkv, out_idx=_grouped_rows(heads, dims, self.num_heads, self.head_dim, 3))
        else:
            for linear in (self.query, self.key, self.value):
                slice_linear(linear, out_idx=cols)
        if self.proj is not None:
            slice_linear(self.proj, in_idx=cols)
        return cols

    def keep_head_dims(self, idx: IndexLike, rescale: bool | None = None) -> Tensor:
        """Keep head coordinates ``idx`` (indices or a boolean keep-vector) in every head, in place.

        Slices q/k/v rows (and biases) and ``proj`` input columns; a set ``head_dim_mask`` is sliced
        to the kept entries (detached: a pruner that still trains it must set it again). With
        ``rescale`` (default: ``slice_rescale``) the scale becomes ``new_head_dim ** -0.5``. Returns the kept
        columns of the (H*d)-wide context, for an output projection that lives outside this module.
        """
        if rescale is None:
            rescale = self.slice_rescale
        keep = _as_index(idx, self.head_dim, "head dim")
        cols = self._slice(torch.arange(self.num_heads), keep)
        mask = sliced_mask(self.head_dim_mask, keep)
        self.head_dim = keep.numel()
        self.head_dim_mask = mask
        if rescale:
            self.scale = self.head_dim**-0.5
        return cols

    def keep_heads(self, idx: IndexLike) -> Tensor:
        """Keep whole heads ``idx`` in place; like :meth:`keep_head_dims`, returns the kept columns."""
        keep = _as_index(idx, self.num_heads, "head")
        cols = self._slice(keep, torch.arange(self.head_dim))
        mask = sliced_mask(self.head_mask, keep)
        self.num_heads = keep.numel()
        self.head_mask = mask
        return cols

    def keep_value_dims(self, widths: Sequence[IndexLike]) -> Tensor:
        """Keep, in every head ``h``, the value coordinates ``widths[h]`` (indices or a boolean keep-vector into
        ``range(head_dim)``), in place: value rows (and biases) and the projection's input columns. Queries and
        keys keep their width and the softmax scale is unchanged. Returns the kept context columns, for an
        output projection outside this module."""
        if self.value_dims is not None:
            raise ValueError("value widths are already uneven; cut them once, from the full head width")
        if len(widths) != self.num_heads:
            raise ValueError(f"keep_value_dims needs one index set per head ({self.num_heads}), got {len(widths)}")
        kept = [_as_index(w, self.head_dim, "value dim") for w in widths]
        cols = torch.cat([h * self.head_dim + k for h, k in enumerate(kept)])
        inner = self.inner_dim
        if self.fused:
            rows = torch.cat([torch.arange(2 * inner), 2 * inner + cols])
            slice_linear(self.qkv, out_idx=rows)
        else:
            slice_linear(self.value, out_idx=cols)
        if self.proj is not None:
            slice_linear(self.proj, in_idx=cols)
        self.value_dims = [int(k.numel()) for k in kept]
        return cols

    def param_cost(self, kind: str) -> int:
        """Parameters removed with one head dim (in every head) or one whole head."""
        bias = int(self.qkv_bias)
        per_coordinate = (self.dim + bias) + 2 * (self.kv_dim + bias)
        if self.proj is not None:
            per_coordinate += self.proj.out_features
        if kind == "head_dim":
            return self.num_heads * per_coordinate
        if kind == "head":
            return self.head_dim * per_coordinate
        raise ValueError(f"Attention has no prunable unit kind {kind!r}")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(_SlotModule):
    """``fc2(act(fc1(x)))`` with a per-instance hidden width.

    ``neuron_mask`` (shape ``(hidden,)``) multiplies the ``fc1`` output before the activation; both
    GELU and QuickGELU map 0 to 0, so a zero entry silences its neuron exactly.
    """

    _slots: ClassVar[dict[str, str | None]] = {"neuron_mask": "hidden"}

    def __init__(
        self,
        dim: int,
        hidden: int,
        out_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(_ACTIVATIONS)}")
        self.dim = dim
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.drop = nn.Dropout(drop)
        self.neuron_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.neuron_mask is not None:
            h = h * self.neuron_mask.to(h.dtype)
        return self.drop(self.fc2(self.drop(self.act(h))))

    def keep_neurons(self, idx: IndexLike) -> None:
        """Keep hidden neurons ``idx`` in place (``fc1`` rows and biases, ``fc2`` columns)."""
        keep = _as_index(idx, self.hidden, "neuron")
        slice_linear(self.fc1, out_idx=keep)
        slice_linear(self.fc2, in_idx=keep)
        mask = sliced_mask(self.neuron_mask, keep)
        self.hidden = keep.numel()
        self.neuron_mask = mask

    def param_cost(self, kind: str = "neuron") -> int:
        """Parameters removed with one hidden neuron."""
        if kind != "neuron":
            raise ValueError(f"Mlp has no prunable unit kind {kind!r}")
        return self.fc1.in_features + int(self.fc1.bias is not None) + self.fc2.out_features


class Block(nn.Module):
    """Pre-norm transformer block with timm parameter names (ViT, DeiT, CLIP, ViLT).

    ``x = x + drop_path1(attn(norm1(x)))``, then ``x = x + drop_path2(mlp(norm2(x)))``, with the token hooks
    of ``token_hooks`` run before the attention (``pre_attn``) and after its residual (``post_self_attn`` and
    ``post_attn``, one place here), before the MLP. ``forward(x, state)`` returns ``(x, state)``: the
    :class:`~models.token_state.TokenState` gives the attention its bias (padding, proportional attention) and
    comes back changed if a hook reduced the tokens; the token count may differ between calls.

    ``token_hooks`` is a plain list (hooks are never registered as submodules; a reducer with weights keeps
    them in a module of the model's own). ``grad_checkpointing`` (off by default) recomputes the attention
    and MLP branches in backward while training, inside ``forward``, so module and parameter names never
    change.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        mlp_hidden: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act: str = "gelu",
        index: int = 0,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        self.index = index
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads, head_dim, qkv_bias=qkv_bias, fused=True, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden or int(dim * mlp_ratio), act=act, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.token_hooks: list[TokenHook] = []
        self.grad_checkpointing = False

    def _attn_branch(self, x: Tensor, bias: Tensor | None, probs: bool, keys: bool, head_out: bool):
        return self.attn(self.norm1(x), mask=bias, need_probs=probs, need_keys=keys, need_head_out=head_out)

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return run_branch(self, fn, *args)

    def forward(self, x: Tensor, state: TokenState | None = None) -> tuple[Tensor, TokenState]:
        state = TokenState() if state is None else state
        hooks = self.token_hooks
        if hooks:
            x, state = run_hooks(hooks, "pre_attn", x, state, HookContext(self.index, "pre_attn"))
        t_in = x.shape[1]
        record = self.index in state.record
        wants = attention_wants(hooks, record)
        result = self._run(self._attn_branch, x, state.attn_bias(x), *wants)
        out = result if isinstance(result, AttentionOutput) else AttentionOutput(result, None, None)
        x = x + self.drop_path1(out.out)
        if record:
            state.maps[self.index] = out.probs
        t_mid = t_in
        if hooks:
            for point in ("post_self_attn", "post_attn"):
                ctx = HookContext(self.index, point, out.probs, out.keys, out.head_out)
                x, state = run_hooks(hooks, point, x, state, ctx)
                t_mid = x.shape[1] if point == "post_self_attn" else t_mid
        state.counts[self.index] = (t_in, t_mid, x.shape[1])
        return x + self.drop_path2(self._run(self._mlp_branch, x)), state


class SkippedBlock(nn.Module):
    """A removed block (UVC's block skipping): it passes the tokens and their state through unchanged. It
    keeps its place in the encoder's list, so the other blocks keep their indices and parameter names."""

    def __init__(self, index: int = 0) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Tensor, state: TokenState | None = None, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
        state = TokenState() if state is None else state
        state.counts[self.index] = (0, 0, 0)
        return x, state


def run_branch(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, recomputed in backward when ``module.grad_checkpointing`` is on while training."""
    if module.grad_checkpointing and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def attention_wants(hooks: Sequence[TokenHook], record: bool = False) -> tuple[bool, bool, bool]:
    """(probabilities, keys, head outputs): what a block's self-attention must return for its hooks after
    attention (and for recording its probabilities)."""
    after = ("post_self_attn", "post_attn")
    return (
        record or hooks_need(hooks, "probs", after),
        hooks_need(hooks, "keys", after),
        hooks_need(hooks, "head_out", after),
    )


UNIT_KINDS: dict[str, tuple[str, str]] = {
    "head_dim": ("head_dim_mask", "keep_head_dims"),
    "head": ("head_mask", "keep_heads"),
    "neuron": ("neuron_mask", "keep_neurons"),
}


@dataclass(eq=False)
class Unit:
    """One family of prunable units: ``size`` units of ``kind`` in ``module``.

    ``cost`` is the number of parameters one unit removes; ``modality`` is one of vision, text,
    cross, decoder. ``module`` provides the mask slot and keep method named in ``UNIT_KINDS``.
    """

    name: str
    module: nn.Module
    kind: str
    size: int
    modality: str = "vision"
    cost: int = 0

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {self.kind!r}; choose from {sorted(UNIT_KINDS)}")

    @property
    def mask_slot(self) -> str:
        return UNIT_KINDS[self.kind][0]

    def set_mask(self, mask: Tensor | None) -> None:
        setattr(self.module, self.mask_slot, mask)

    def keep(self, idx: IndexLike, **kwargs: Any) -> Any:
        return getattr(self.module, UNIT_KINDS[self.kind][1])(idx, **kwargs)


def module_units(name: str, module: nn.Module, modality: str = "vision") -> list[Unit]:
    """Units of an :class:`Attention` (head dims, heads) or an :class:`Mlp` (neurons)."""
    if isinstance(module, Attention):
        return [
            Unit(name, module, "head_dim", module.head_dim, modality, module.param_cost("head_dim")),
            Unit(name, module, "head", module.num_heads, modality, module.param_cost("head")),
        ]
    if isinstance(module, Mlp):
        return [Unit(name, module, "neuron", module.hidden, modality, module.param_cost())]
    raise TypeError(f"{name}: no prunable units in a {type(module).__name__}")
