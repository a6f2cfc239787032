"""BLIP's text transformer "MED": a BERT encoder / decoder with cross-attention to image tokens.

Parameter names follow Hugging Face BERT as BLIP modified it (``embeddings.*``,
``encoder.layer.{i}.attention.self.{query,key,value}``, ``attention.output.*``, ``crossattention.*``,
``intermediate.dense``, ``output.*``; ``cls.predictions.*`` for the LM head), so official BLIP state
dicts load with ``strict=True``. There are no token-type embeddings, no pooler and no
``embeddings.position_ids`` buffer (checkpoints carry it; loaders drop it).

One :class:`BertModel` serves three roles chosen per call: ``mode="text"`` (bidirectional, the
cross-attention is skipped), ``mode="multimodal"`` (bidirectional + cross-attention to
``encoder_hidden_states``) and ``is_decoder=True`` (causal, with a key/value cache for incremental
decoding). ``twin_cross_attention=True`` builds the NLVR2 variant whose layers attend to two images.

Layers are post-norm: ``LN(x + dense(attn(x)))`` for self- and cross-attention, then
``LN(h + output(GELU(intermediate(h))))``. Masks are additive with -10000 as in BERT.

Pruning seams, in the style of :mod:`models.layers`: every attention is a
:class:`models.layers.Attention` (split q/k/v, no internal projection) whose ``keep_head_dims`` /
``keep_heads`` also slice the output ``dense`` that follows it; the FFN has a ``neuron_mask`` slot on
``intermediate``; every layer has a ``token_hook`` slot; :func:`prunable_units` lists it all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    Attention,
    AttentionOutput,
    IndexLike,
    KVCache,
    SkippedBlock,
    Unit,
    _as_index,
    _SlotModule,
    attention_wants,
    checkpoint_last_blocks,
    module_units,
    slice_linear,
    sliced_mask,
)
from .token_state import MASK_VALUE, HookContext, TokenHook, TokenState, extended_attention_mask, hooks_need, run_hooks

__all__ = [
    "BertAttention",
    "BertLMHeadModel",
    "BertLayer",
    "BertModel",
    "BertSelfAttention",
    "BertTwinCrossAttention",
    "LMOutput",
    "MASK_VALUE",
    "MedCache",
    "MedConfig",
    "beam_search",
    "extended_attention_mask",
    "nucleus_sample",
    "prunable_units",
]

# Keys of Hugging Face config files that carry no architecture information for MED.
_IGNORED_CONFIG_KEYS = frozenset(
    {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "is_decoder"}
)


# ------------------------------------------------------------------------------------------------ config


@dataclass
class MedConfig:
    """Architecture of MED; the field names and defaults are those of BLIP's ``med_config.json``.

    ``encoder_width`` is the width of the states the cross-attention reads (the ViT width for modules
    that attend to the image, the text width for the VQA answer decoder); BLIP overwrites it at build
    time. ``type_vocab_size`` is kept for file compatibility only: MED has no token-type embeddings.
    """

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    pad_token_id: int = 0
    type_vocab_size: int = 2
    encoder_width: int | None = None
    add_cross_attention: bool = True

    def __post_init__(self) -> None:
        if self.encoder_width is None:
            self.encoder_width = self.hidden_size
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; choose from {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> MedConfig:
        """Build from a ``med_config.json``-style mapping; unknown keys are an error (typos would
        otherwise silently keep a default)."""
        known = {f.name for f in fields(cls)}
        merged = {**values, **overrides}
        unknown = sorted(k for k in merged if k not in known and k not in _IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown MED config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in merged.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> MedConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MED config file {path} does not exist")
        return cls.from_dict(json.loads(path.read_text()), **overrides)

    @classmethod
    def coerce(cls, config: MedConfig | Mapping[str, Any] | Any) -> MedConfig:
        """Accept a :class:`MedConfig`, a mapping, or any object with the same attribute names
        (e.g. a ``transformers.BertConfig``)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # exact erf GELU, as BERT's "gelu"
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


# ------------------------------------------------------------------------------------------------ masks


def _encoder_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None]
    else:
        raise ValueError(f"encoder_attention_mask must be (B, N) or (B, T, N), got shape {tuple(mask.shape)}")
    return (1.0 - mask.to(dtype)) * MASK_VALUE


# ------------------------------------------------------------------------------------------------ cache


class MedCache:
    """Per-layer key/value caches of one incremental decoding run.

    Self-attention caches grow by the new tokens at every call; cross-attention caches hold the
    projected encoder states, computed at the first call and reused afterwards.
    """

    def __init__(self, num_layers: int) -> None:
        self.self_attn = [KVCache() for _ in range(num_layers)]
        self.cross_attn = [KVCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Number of tokens already cached."""
        k = self.self_attn[0].k if self.self_attn else None
        return 0 if k is None else k.shape[2]

    def reorder(self, index: Tensor, include_cross: bool = True) -> None:
        """Keep rows ``index`` (e.g. the surviving beams) of every cache, in that order."""
        caches = self.self_attn + (self.cross_attn if include_cross else [])
        for cache in caches:
            if cache.k is not None:
                cache.k = cache.k.index_select(0, index.to(cache.k.device))
                cache.v = cache.v.index_select(0, index.to(cache.v.device))


# ------------------------------------------------------------------------------------------------ modules


class BertSelfAttention(Attention):
    """Split-layout attention (``query``/``key``/``value``) that also owns the slicing of the output
    ``dense`` following it, so that a pruner's ``keep_head_dims`` leaves a consistent model.

    The output Linear is bound with :meth:`bind_output` and held without registration: it stays a
    parameter of its own parent (``attention.output.dense``), where checkpoints expect it.
    The scale is ``head_dim ** -0.5`` of the current width, as BERT recomputes it after pruning.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, kv_dim: int, attn_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, head_dim, kv_dim=kv_dim, fused=False, proj=False, attn_drop=attn_drop)
        object.__setattr__(self, "_output_dense", None)

    def bind_output(self, dense: nn.Linear) -> None:
        if dense.in_features != self.inner_dim:
            raise ValueError(f"output dense takes {dense.in_features} inputs but the attention yields {self.inner_dim}")
        object.__setattr__(self, "_output_dense", dense)

    @property
    def output_dense(self) -> nn.Linear | None:
        return self._output_dense

    def _slice_output(self, cols: Tensor) -> Tensor:
        if self._output_dense is not None:
            slice_linear(self._output_dense, in_idx=cols)
        return cols

    def keep_head_dims(self, idx: IndexLike, rescale: bool = True) -> Tensor:
        """Keep head coordinates ``idx`` in every head, and the matching output-dense columns.

        BERT's attention derives its scale from the head width, so by default the scale becomes
        ``new_head_dim ** -0.5`` (the behaviour released compressed BLIP text models rely on); with
        ``rescale=False`` the sliced model equals the masked one exactly.
        """
        return self._slice_output(super().keep_head_dims(idx, rescale=rescale))

    def keep_heads(self, idx: IndexLike) -> Tensor:
        return self._slice_output(super().keep_heads(idx))

    def keep_value_dims(self, widths: Sequence[IndexLike]) -> Tensor:
        return self._slice_output(super().keep_value_dims(widths))

    def param_cost(self, kind: str) -> int:
        cost = super().param_cost(kind)
        out = self._output_dense.out_features if self._output_dense is not None else 0
        return cost + out * (self.num_heads if kind == "head_dim" else self.head_dim)


def _attend(
    attn: Attention,
    x: Tensor,
    context: Tensor | None,
    mask: Tensor | None,
    kv_cache: KVCache | None,
    need_probs: bool,
    need_keys: bool,
    need_head_out: bool = False,
) -> AttentionOutput:
    # Asking for probabilities leaves the fused SDPA kernel, so only do it on request.
    if need_probs or need_keys or need_head_out:
        return attn(
            x,
            context=context,
            mask=mask,
            need_probs=need_probs,
            need_keys=need_keys,
            kv_cache=kv_cache,
            need_head_out=need_head_out,
        )
    return AttentionOutput(attn(x, context=context, mask=mask, kv_cache=kv_cache), None, None)


class BertSelfOutput(nn.Module):
    def __init__(self, in_features: int, dim: int, eps: float, drop: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """``self`` (attention) followed by ``output`` (dense, dropout, residual LayerNorm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        kv_dim: int,
        eps: float,
        attn_drop: float = 0.0,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.self = BertSelfAttention(dim, num_heads, head_dim, kv_dim, attn_drop)
        self.output = BertSelfOutput(num_heads * head_dim, dim, eps, drop)
        self.self.bind_output(self.output.dense)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_probs: bool = False,
        need_keys: bool = False,
        need_head_out: bool = False,
    ) -> AttentionOutput:
        """Attend from ``x`` to itself or to ``context``; ``mask`` is additive over the keys."""
        out = _attend(self.self, x, context, mask, kv_cache, need_probs, need_keys, need_head_out)
        return AttentionOutput(self.output(out.out, x), out.probs, out.keys, out.head_out)


class BertTwinOutput(nn.Module):
    """Projects both branches (``dense0``/``dense1``), fuses them and adds the shared residual norm.

    Fusion is the mean of the two projections, or ``merge_layer`` (Linear 2D -> D, no activation) on
    their concatenation in the layers that have one.
    """

    def __init__(self, in_features: Sequence[int], dim: int, eps: float, drop: float, merge: bool) -> None:
        super().__init__()
        self.dense0 = nn.Linear(in_features[0], dim)
        self.dense1 = nn.Linear(in_features[1], dim)
        self.merge_layer = nn.Linear(2 * dim, dim) if merge else None
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(drop)

    def forward(self, x0: Tensor, x1: Tensor, residual: Tensor) -> Tensor:
        h0, h1 = self.dense0(x0), self.dense1(x1)
        fused = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(fused) + residual)


class BertTwinCrossAttention(nn.Module):
    """NLVR2 cross-attention: ``self0`` attends to the first image, ``self1`` to the second."""

    def __init__(
        self,
        dim: int,
        num_heads: Sequence[int],
        head_dims: Sequence[int],
        kv_dim: int,
        eps: float,
        merge: bool,
        attn_drop: float = 0.0,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.self0 = BertSelfAttention(dim, num_heads[0], head_dims[0], kv_dim, attn_drop)
        self.self1 = BertSelfAttention(dim, num_heads[1], head_dims[1], kv_dim, attn_drop)
        inner = (num_heads[0] * head_dims[0], num_heads[1] * head_dims[1])
        self.output = BertTwinOutput(inner, dim, eps, drop, merge)
        self.self0.bind_output(self.output.dense0)
        self.self1.bind_output(self.output.dense1)

    def forward(
        self, x: Tensor, contexts: Sequence[Tensor], masks: Sequence[Tensor | None], need_probs: bool = False
    ) -> AttentionOutput:
        outs = [
            _attend(attn, x, ctx, m, None, need_probs, False)
            for attn, ctx, m in zip((self.self0, self.self1), contexts, masks)
        ]
        probs = (outs[0].probs, outs[1].probs) if need_probs else None
        return AttentionOutput(self.output(outs[0].out, outs[1].out, x), probs, None)


class BertIntermediate(_SlotModule):
    """``GELU(dense(x))`` with a ``neuron_mask`` slot applied before the activation.

    Like :class:`BertSelfAttention`, it slices the ``output.dense`` that consumes it (bound with
    :meth:`bind_output`, not registered) when neurons are removed.
    """

    _slots: ClassVar[dict[str, str | None]] = {"neuron_mask": "hidden"}

    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.dense = nn.Linear(dim, hidden)
        self.intermediate_act_fn = _ACTIVATIONS[act]()
        self.neuron_mask: Tensor | None = None
        object.__setattr__(self, "_output_dense", None)

    def bind_output(self, dense: nn.Linear) -> None:
        if dense.in_features != self.hidden:
            raise ValueError(f"output dense takes {dense.in_features} inputs but the FFN has {self.hidden} neurons")
        object.__setattr__(self, "_output_dense", dense)

    @property
    def output_dense(self) -> nn.Linear | None:
        return self._output_dense

    def forward(self, x: Tensor) -> Tensor:
        h = self.dense(x)
        if self.neuron_mask is not None:
            h = h * self.neuron_mask.to(h.dtype)
        return self.intermediate_act_fn(h)

    def keep_neurons(self, idx: IndexLike) -> None:
        """Keep neurons ``idx``: rows (and biases) of ``dense``, columns of the bound output dense."""
        keep = _as_index(idx, self.hidden, "neuron")
        slice_linear(self.dense, out_idx=keep)
        if self._output_dense is not None:
            slice_linear(self._output_dense, in_idx=keep)
        mask = sliced_mask(self.neuron_mask, keep)
        self.hidden = keep.numel()
        self.neuron_mask = mask

    def param_cost(self, kind: str = "neuron") -> int:
        if kind != "neuron":
            raise ValueError(f"BertIntermediate has no prunable unit kind {kind!r}")
        out = self._output_dense.out_features if self._output_dense is not None else 0
        return self.dim + 1 + out


class BertOutput(BertSelfOutput):
    """FFN output: dense (hidden -> D), dropout, residual LayerNorm."""


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types)."""

    def __init__(self, config: MedConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None, past_length: int = 0
    ) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        length = x.shape[1]
        limit = self.position_embeddings.num_embeddings
        if past_length + length > limit:
            raise ValueError(f"{past_length + length} positions exceed max_position_embeddings={limit}")
        positions = torch.arange(past_length, past_length + length, device=x.device)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions)[None]))


class BertLayer(nn.Module):
    """Self-attention, optional cross-attention (single or NLVR2 twin), FFN, with token hooks.

    ``forward(x, state, ...)`` returns ``(x, state)``. The hooks of ``token_hooks`` run at the three points
    of :mod:`models.token_state`: ``pre_attn`` (the layer input), ``post_self_attn`` (after the self-attention
    sub-layer, before the cross-attention: text pruned here leaves the cross-attention with fewer queries)
    and ``post_attn`` (after the cross-attention, before the FFN). The self-attention bias comes from the
    state (padding mask, causality over the cache), so a hook that drops text tokens updates the state's
    mask with them. In ``ctx`` a hook finds, on request (``needs``), the self-attention probabilities, keys
    and head outputs, and at ``post_attn`` the cross-attention probabilities (a pair for twin layers).

    ``grad_checkpointing`` recomputes each branch in backward while training (never with a cache).
    """

    def __init__(
        self,
        config: MedConfig,
        index: int,
        heads: int,
        head_dim: int,
        mlp_hidden: int,
        cross: bool = False,
        cross_heads: int | Sequence[int] | None = None,
        cross_head_dims: int | Sequence[int] | None = None,
        twin: bool = False,
        merge: bool = False,
    ) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        attn_drop, drop = config.attention_probs_dropout_prob, config.hidden_dropout_prob
        self.index = index
        self.twin = twin
        self.attention = BertAttention(d, heads, head_dim, d, eps, attn_drop, drop)
        if cross and twin:
            self.crossattention = BertTwinCrossAttention(
                d, cross_heads, cross_head_dims, config.encoder_width, eps, merge, attn_drop, drop
            )
        elif cross:
            self.crossattention = BertAttention(
                d, cross_heads, cross_head_dims, config.encoder_width, eps, attn_drop, drop
            )
        else:
            self.crossattention = None
        self.intermediate = BertIntermediate(d, mlp_hidden, config.hidden_act)
        self.output = BertOutput(mlp_hidden, d, eps, drop)
        self.intermediate.bind_output(self.output.dense)
        self.token_hooks: list[TokenHook] = []
        self.grad_checkpointing = False

    def _ffn(self, x: Tensor) -> Tensor:
        return self.output(self.intermediate(x), x)

    def _cross(self, x: Tensor, context: Any, mask: Any, need_probs: bool, cache: KVCache | None) -> AttentionOutput:
        if self.twin:
            if not isinstance(context, (list, tuple)) or len(context) != 2:
                raise ValueError("twin cross-attention needs a list of two encoder states (one per image)")
            if cache is not None:
                raise ValueError("twin cross-attention does not support incremental decoding")
            masks = mask if mask is not None else (None, None)
            return self.crossattention(x, context, masks, need_probs)
        if isinstance(context, (list, tuple)):
            raise ValueError("a list of encoder states needs a model built with twin_cross_attention=True")
        return self.crossattention(x, mask=mask, context=context, kv_cache=cache, need_probs=need_probs)

    def forward(
        self,
        x: Tensor,
        state: TokenState | None = None,
        encoder_hidden_states: Tensor | Sequence[Tensor] | None = None,
        encoder_mask: Tensor | Sequence[Tensor | None] | None = None,
        cache: tuple[KVCache, KVCache] | None = None,
    ) -> tuple[Tensor, TokenState]:
        """``encoder_hidden_states=None`` skips the cross-attention (text mode); ``encoder_mask`` is additive."""
        state = TokenState() if state is None else state
        hooks = self.token_hooks
        if hooks and cache is not None:
            raise ValueError("token hooks cannot run with a key/value cache (incremental decoding)")
        if hooks:
            x, state = run_hooks(hooks, "pre_attn", x, state, HookContext(self.index, "pre_attn"))
        t_in = x.shape[1]
        record = self.index in state.record
        need_probs, need_keys, need_head_out = attention_wants(hooks, record)
        need_cross = record or hooks_need(hooks, "probs", ("post_attn",))
        self_cache, cross_cache = cache if cache is not None else (None, None)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None

        def run(fn: Callable[..., Any], *args: Any) -> Any:
            return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)

        bias = state.attn_bias(x)
        out = run(self.attention, x, bias, None, self_cache, need_probs, need_keys, need_head_out)
        x = out.out
        if hooks:
            ctx = HookContext(self.index, "post_self_attn", out.probs, out.keys, out.head_out)
            x, state = run_hooks(hooks, "post_self_attn", x, state, ctx)
        t_mid = x.shape[1]
        cross_probs = None
        if encoder_hidden_states is not None:
            if self.crossattention is None:
                raise ValueError("this model has no cross-attention; call it with mode='text'")
            x, cross_probs, _, _ = run(self._cross, x, encoder_hidden_states, encoder_mask, need_cross, cross_cache)
        if record:
            state.maps[self.index] = out.probs
            state.cross_maps[self.index] = cross_probs
        if hooks:
            ctx = HookContext(self.index, "post_attn", out.probs, out.keys, out.head_out, cross_probs)
            x, state = run_hooks(hooks, "post_attn", x, state, ctx)
        state.counts[self.index] = (t_in, t_mid, x.shape[1])
        return run(self._ffn, x), state


class BertEncoder(nn.Module):
    def __init__(self, layers: Iterable[BertLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


def _per_layer(values: Sequence[Any] | None, default: Any, depth: int, what: str) -> list[Any]:
    if values is None:
        return [default] * depth
    values = list(values)
    if len(values) != depth:
        raise ValueError(f"{what} lists {len(values)} layers but num_hidden_layers is {depth}")
    return values


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{what} of a twin layer must be one int or a pair, got {value!r}")
    return pair


class BertModel(nn.Module):
    """MED text transformer returning the last hidden states (B, T, D).

    ``heads``, ``head_dims``, ``mlp_hidden``, ``cross_heads`` and ``cross_head_dims`` give per-layer
    widths (``None``: the dense widths of ``config``); for twin layers a cross entry may be a pair
    (``self0``, ``self1``). :meth:`block_widths` returns them, so a compressed model is rebuilt with
    ``BertModel(config, **model.block_widths())``. ``twin_cross_attention`` builds the NLVR2 encoder,
    whose layers from ``merge_from`` on fuse the two images with ``merge_layer``.
    """

    def __init__(
        self,
        config: MedConfig | Mapping[str, Any] | Any,
        add_pooling_layer: bool = False,
        *,
        twin_cross_attention: bool = False,
        merge_from: int = 6,
        heads: Sequence[int] | None = None,
        head_dims: Sequence[int] | None = None,
        mlp_hidden: Sequence[int] | None = None,
        cross_heads: Sequence[int | Sequence[int]] | None = None,
        cross_head_dims: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if add_pooling_layer:
            raise ValueError("MED has no pooler; BLIP always builds it with add_pooling_layer=False")
        config = MedConfig.coerce(config)
        d, n = config.hidden_size, config.num_attention_heads
        if d % n:
            raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {n}")
        depth = config.num_hidden_layers
        cross = config.add_cross_attention
        if not cross and (cross_heads is not None or cross_head_dims is not None or twin_cross_attention):
            raise ValueError("cross-attention widths or twin layers given but config.add_cross_attention is false")
        self.config = config
        self.twin_cross_attention = twin_cross_attention
        self.merge_from = merge_from

        heads = _per_layer(heads, n, depth, "heads")
        head_dims = _per_layer(head_dims, d // n, depth, "head_dims")
        mlp_hidden = _per_layer(mlp_hidden, config.intermediate_size, depth, "mlp_hidden")
        cross_heads = _per_layer(cross_heads, n, depth, "cross_heads")
        cross_head_dims = _per_layer(cross_head_dims, d // n, depth, "cross_head_dims")
        if twin_cross_attention:
            cross_heads = [_pair(v, "cross_heads") for v in cross_heads]
            cross_head_dims = [_pair(v, "cross_head_dims") for v in cross_head_dims]

        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(
            BertLayer(
                config,
                i,
                heads[i],
                head_dims[i],
                mlp_hidden[i],
                cross=cross,
                cross_heads=cross_heads[i],
                cross_head_dims=cross_head_dims[i],
                twin=twin_cross_attention,
                merge=twin_cross_attention and i >= merge_from,
            )
            for i in range(depth)
        )
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BLIP's BERT init: normal(0, initializer_range) for Linear and Embedding (padding row included).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def set_grad_checkpointing(self, enable: bool = True, last_k: int | None = None) -> None:
        """Checkpoint the branches of the last ``last_k`` layers (all when ``None``)."""
        checkpoint_last_blocks(self.layers, enable, last_k)

    def block_widths(self) -> dict[str, list[Any]]:
        """Per-layer widths; passed back to the constructor they rebuild this architecture."""
        widths: dict[str, list[Any]] = {
            "heads": [layer.attention.self.num_heads for layer in self.layers],
            "head_dims": [layer.attention.self.head_dim for layer in self.layers],
            "mlp_hidden": [layer.intermediate.hidden for layer in self.layers],
        }
        if self.config.add_cross_attention:
            attns = [_cross_attentions(layer) for layer in self.layers]
            if self.twin_cross_attention:
                widths["cross_heads"] = [[a.num_heads for a in pair] for pair in attns]
                widths["cross_head_dims"] = [[a.head_dim for a in pair] for pair in attns]
            else:
                widths["cross_heads"] = [pair[0].num_heads for pair in attns]
                widths["cross_head_dims"] = [pair[0].head_dim for pair in attns]
        return widths

    def new_cache(self) -> MedCache:
        return MedCache(len(self.layers))

    def encode(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | Sequence[Tensor] | None = None,
        encoder_attention_mask: Tensor | Sequence[Tensor] | None = None,
        *,
        mode: str = "multimodal",
        is_decoder: bool = False,
        inputs_embeds: Tensor | None = None,
        cache: MedCache | None = None,
        record_attn: Iterable[int] = (),
    ) -> tuple[Tensor, TokenState]:
        """Last hidden states (B, T', D) of the text tokens and their :class:`TokenState` (T' < T when token
        hooks dropped text tokens; ``state.padding_mask(hidden)`` is then the mask of what is left).

        ``attention_mask`` is the 0/1 padding mask (B, cached + T) (``None``: all ones).
        ``mode="text"`` ignores the encoder states; ``"multimodal"`` requires them: (B, N, W) with an
        optional 0/1 ``encoder_attention_mask`` (B, N), or for twin models a list of two of each.
        ``is_decoder`` makes the self-attention causal; ``cache`` (from :meth:`new_cache`, decoders
        only) is filled with this call's keys/values, and the next call passes only the new tokens.
        ``record_attn`` lists layers whose self- and cross-attention probabilities are kept in
        ``state.maps`` and ``state.cross_maps``.
        """
        if mode not in ("text", "multimodal"):
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
        if cache is not None and not is_decoder:
            raise ValueError("a key/value cache needs is_decoder=True: bidirectional attention cannot be extended")
        if mode == "multimodal":
            if not self.config.add_cross_attention:
                raise ValueError("this model has no cross-attention; call it with mode='text'")
            if encoder_hidden_states is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states")
        else:
            encoder_hidden_states = encoder_attention_mask = None

        past = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, inputs_embeds, past)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != past + x.shape[1]:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but there are {past + x.shape[1]} "
                f"({past} cached + {x.shape[1]} new)"
            )
        enc_mask: Any = None
        if encoder_attention_mask is not None:
            if isinstance(encoder_attention_mask, (list, tuple)):
                enc_mask = [_encoder_mask(m, x.dtype) for m in encoder_attention_mask]
            else:
                enc_mask = _encoder_mask(encoder_attention_mask, x.dtype)

        state = TokenState.start(attention_mask, causal=is_decoder, past=past, record=record_attn)
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.self_attn[i], cache.cross_attn[i]) if cache is not None else None
            x, state = layer(x, state, encoder_hidden_states, enc_mask, layer_cache)
        return x, state

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Last hidden states (B, T', D); arguments as :meth:`encode`, which also returns the token state."""
        return self.encode(*args, **kwargs)[0]


def _cross_attentions(layer: BertLayer) -> list[BertSelfAttention]:
    ca = layer.crossattention
    if ca is None:
        return []
    if isinstance(ca, BertTwinCrossAttention):
        return [ca.self0, ca.self1]
    return [ca.self]


# ------------------------------------------------------------------------------------------------ LM head


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: MedConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _ACTIVATIONS[config.hidden_act]()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class TiedDecoder(nn.Module):
    """Vocabulary projection whose weight *is* the word-embedding matrix and whose bias *is* the
    prediction head's ``bias``, looked up at every call.

    Owning no parameters, it cannot drift from the embedding: loading a state dict or replacing the
    embedding's Parameter (e.g. after slicing widths) changes both at once.
    """

    def __init__(self, embedding: nn.Embedding, head: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        object.__setattr__(self, "_head", head)

    @property
    def weight(self) -> nn.Parameter:
        return self._embedding.weight

    @property
    def bias(self) -> nn.Parameter:
        return self._head.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: MedConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = TiedDecoder(embedding, self)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: MedConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, embedding)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


class LMOutput(NamedTuple):
    loss: Tensor | None
    logits: Tensor


_TIED = (
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("cls.predictions.decoder.bias", "cls.predictions.bias"),
)


def _add_tied_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # Official checkpoints list the tied tensors under both names; so does ours.
    for alias, source in _TIED:
        if prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]


def _take_tied_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    for alias, source in _TIED:
        if prefix + alias not in state_dict:
            continue
        value = state_dict.pop(prefix + alias)
        if prefix + source not in state_dict:
            state_dict[prefix + source] = value
        elif not (value.shape == state_dict[prefix + source].shape and torch.equal(value, state_dict[prefix + source])):
            error_msgs.append(
                f"{prefix + alias} differs from {prefix + source}, but the two are one tied tensor in this model"
            )


class BertLMHeadModel(nn.Module):
    """MED decoder: :class:`BertModel` (``bert``) plus the LM head (``cls.predictions``).

    ``cls.predictions.decoder`` reads ``bert.embeddings.word_embeddings.weight`` and
    ``cls.predictions.bias`` at every call (one parameter each, tied for good). The state dict lists
    them under both names, as official checkpoints do; loading accepts either name and rejects two
    different tensors. Width keyword arguments are those of :class:`BertModel`.
    """

    def __init__(
        self, config: MedConfig | Mapping[str, Any] | Any, *, label_smoothing: float = 0.1, **widths: Any
    ) -> None:
        super().__init__()
        config = MedConfig.coerce(config)
        self.config = config
        self.label_smoothing = label_smoothing
        self.bert = BertModel(config, add_pooling_layer=False, **widths)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.cls.apply(self.bert._init_weights)
        self.register_state_dict_post_hook(_add_tied_keys)
        self.register_load_state_dict_pre_hook(_take_tied_keys)

    def block_widths(self) -> dict[str, list[Any]]:
        return self.bert.block_widths()

    def set_grad_checkpointing(self, enable: bool = True, last_k: int | None = None) -> None:
        self.bert.set_grad_checkpointing(enable, last_k)

    def new_cache(self) -> MedCache:
        return self.bert.new_cache()

    def lm_loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy with label smoothing; positions labelled -100 are ignored.

        ``reduction="mean"`` averages over the counted tokens; ``"none"`` returns one loss per
        sequence, the sum over its tokens.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        loss = F.cross_entropy(
            shifted.float(), targets, ignore_index=-100, reduction=reduction, label_smoothing=self.label_smoothing
        )
        return loss if reduction == "mean" else loss.view(labels.shape[0], -1).sum(1)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        reduction: str = "mean",
        mode: str = "multimodal",
        is_decoder: bool = True,
        inputs_embeds: Tensor | None = None,
        cache: MedCache | None = None,
        record_attn: Iterable[int] = (),
    ) -> LMOutput:
        """Logits (B, T, V) for every position, and the LM loss (see :meth:`lm_loss`) when ``labels``
        (B, T) are given. Other arguments as in :meth:`BertModel.encode`."""
        hidden = self.bert(
            input_ids,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            mode=mode,
            is_decoder=is_decoder,
            inputs_embeds=inputs_embeds,
            cache=cache,
            record_attn=record_attn,
        )
        logits = self.cls(hidden)
        loss = self.lm_loss(logits, labels, reduction) if labels is not None else None
        return LMOutput(loss, logits)

    def _step_fn(
        self, encoder_hidden_states: Tensor | None, encoder_attention_mask: Tensor | None, reorder_cross: bool
    ) -> Callable[[Tensor, Tensor | None], Tensor]:
        cache = self.new_cache()
        mode = "text" if encoder_hidden_states is None else "multimodal"

        def step(tokens: Tensor, reorder: Tensor | None) -> Tensor:
            if reorder is not None:
                cache.reorder(reorder, include_cross=reorder_cross)
            new = tokens[:, cache.length :]
            logits = self(
                new,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                mode=mode,
                cache=cache,
            ).logits
            return logits[:, -1]

        return step

    @torch.no_grad()
    def beam_search(
        self,
        input_ids: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        *,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 0,
        eos_token_id: int,
        pad_token_id: int,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
    ) -> Tensor:
        """Beam search from the prompts ``input_ids`` (B, L), each sample with its own encoder states
        (B, N, W) (expanded per beam here). See :func:`beam_search`; returns (B * num_return_sequences,
        ≤ max_length) token ids including the prompt."""
        enc, enc_mask = _expand(encoder_hidden_states, num_beams), _expand(encoder_attention_mask, num_beams)
        # Beams only ever move within their own sample, whose cross-attention keys are identical.
        step = self._step_fn(enc, enc_mask, reorder_cross=False)
        return beam_search(
            step,
            input_ids,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_return_sequences=num_return_sequences,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        *,
        sample: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        top_k: int = 50,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        eos_token_id: int,
        pad_token_id: int,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Beam search (default) or, with ``sample=True``, nucleus sampling (:func:`nucleus_sample`).

        Lengths count the prompt. Call on a model in eval mode: dropout is not switched off here.
        """
        if not sample:
            return self.beam_search(
                input_ids,
                encoder_hidden_states,
                encoder_attention_mask,
                num_beams=num_beams,
                max_length=max_length,
                min_length=min_length,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                repetition_penalty=repetition_penalty,
                length_penalty=length_penalty,
                num_return_sequences=num_return_sequences,
            )
        n = num_return_sequences
        step = self._step_fn(_expand(encoder_hidden_states, n), _expand(encoder_attention_mask, n), True)
        return nucleus_sample(
            step,
            input_ids.repeat_interleave(n, dim=0),
            max_length=max_length,
            min_length=min_length,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            top_p=top_p,
            top_k=top_k,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            generator=generator,
        )


def _expand(t: Tensor | None, n: int) -> Tensor | None:
    return t if t is None or n == 1 else t.repeat_interleave(n, dim=0)


# ------------------------------------------------------------------------------------------------ decoding

StepFn = Callable[[Tensor, "Tensor | None"], Tensor]


def _checked_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"step must return next-token logits ({tokens.shape[0]}, V), got {tuple(logits.shape)}")
    return logits


def _repetition_penalty(scores: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    # Hugging Face's rule: negative scores of seen tokens are multiplied, positive ones divided.
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, tokens)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, tokens, seen)


def _forbid_eos(scores: Tensor, length: int, min_length: int, eos_token_id: int) -> Tensor:
    if length < min_length:
        scores = scores.clone()
        scores[:, eos_token_id] = -math.inf
    return scores


class _Hypotheses:
    """The ``num_beams`` best finished sequences of one sample, scored sum-log-prob / length^penalty."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.items: list[tuple[float, Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / tokens.shape[-1] ** self.length_penalty
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        # Without early stopping: done once no open beam can beat the worst kept hypothesis.
        if len(self.items) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / length**self.length_penalty

    def best(self, n: int) -> list[Tensor]:
        ranked = sorted(self.items, key=lambda item: item[0])
        return [ranked.pop()[1] for _ in range(n)]


def beam_search(
    step: StepFn,
    input_ids: Tensor,
    *,
    num_beams: int,
    max_length: int,
    min_length: int = 0,
    eos_token_id: int,
    pad_token_id: int,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
) -> Tensor:
    """Beam search with the semantics of Hugging Face transformers 4.15 ``generate`` (BLIP's stack).

    ``step(tokens, reorder)`` returns the next-token logits (B*K, V) for the sequences ``tokens``
    (B*K, t), beams of one sample adjacent; when ``reorder`` is given, the beams were re-selected and
    row ``i`` now continues old row ``reorder[i]`` (reorder any cache first).

    Per step: log-softmax, then the repetition penalty and, while the length is below
    ``min_length``, EOS forbidden; add the running beam scores; keep the top 2K candidates of each
    sample; a candidate ending in EOS among the first K closes a hypothesis scored sum-log-prob /
    length^length_penalty, where the length counts the prompt but not the EOS; the first K other
    candidates continue. A sample is done once K hypotheses exist and none of them is worse than the
    best open candidate could be (no early stopping); the search stops when every sample is done or
    ``max_length`` tokens exist. Unfinished samples then add their open beams. The result, best first
    per sample, carries EOS after each hypothesis shorter than ``max_length`` and ``pad_token_id``
    after that.
    """
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    batch, prompt = input_ids.shape
    if prompt >= max_length:
        raise ValueError(f"the prompt already has {prompt} tokens; max_length={max_length} leaves none to generate")
    k = num_beams
    device = input_ids.device
    tokens = input_ids.repeat_interleave(k, dim=0)
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = -1e9  # the K copies of the prompt must not all expand the same way
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(k, length_penalty) for _ in range(batch)]
    done = [False] * batch
    reorder: Tensor | None = None
    own_rows = torch.arange(k, device=device)

    while True:
        length = tokens.shape[1]
        scores = F.log_softmax(_checked_logits(step(tokens, reorder), tokens).float(), dim=-1)
        scores = _repetition_penalty(scores, tokens, repetition_penalty)
        scores = _forbid_eos(scores, length, min_length, eos_token_id)
        scores = scores + beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_ids = scores.view(batch, k * vocab).topk(2 * k, dim=1)
        top_beams, top_tokens = top_ids // vocab, top_ids % vocab

        next_scores = torch.zeros(batch, k, device=device)
        next_tokens = torch.full((batch, k), pad_token_id, dtype=tokens.dtype, device=device)
        next_rows = (torch.arange(batch, device=device)[:, None] * k + own_rows).clone()
        for b in range(batch):
            if done[b]:
                continue
            filled = 0
            for rank in range(2 * k):
                token, row = int(top_tokens[b, rank]), b * k + int(top_beams[b, rank])
                if token == eos_token_id:
                    if rank < k:
                        hyps[b].add(tokens[row].clone(), float(top_scores[b, rank]))
                else:
                    next_scores[b, filled] = top_scores[b, rank]
                    next_tokens[b, filled] = token
                    next_rows[b, filled] = row
                    filled += 1
                if filled == k:
                    break
            done[b] = hyps[b].is_done(float(top_scores[b].max()), length)

        reorder = next_rows.view(-1)
        tokens = torch.cat([tokens[reorder], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)
        if all(done) or tokens.shape[1] >= max_length:
            break

    for b in range(batch):
        if not done[b]:
            for row in range(b * k, (b + 1) * k):
                hyps[b].add(tokens[row], float(beam_scores[row]))
    best = [seq for h in hyps for seq in h.best(num_return_sequences)]
    width = min(max(len(seq) for seq in best) + 1, max_length)
    out = torch.full((len(best), width), pad_token_id, dtype=tokens.dtype, device=device)
    for i, seq in enumerate(best):
        out[i, : len(seq)] = seq
        if len(seq) < max_length:
            out[i, len(seq)] = eos_token_id
    return out


def _top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, -math.inf)


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token once the mass before it already exceeds top_p; the most likely token always stays.
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def nucleus_sample(
    step: StepFn,
    input_ids: Tensor,
    *,
    max_length: int,
    min_length: int = 0,
    eos_token_id: int,
    pad_token_id: int,
    top_p: float = 0.9,
    top_k: int = 50,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sampling as in Hugging Face transformers 4.15 ``generate(do_sample=True)``.

    On the raw logits: the repetition penalty, EOS forbidden below ``min_length``; then temperature,
    top-k (transformers' default of 50 applied whenever the caller set none, as BLIP's captioner
    did) and top-p filtering; one token drawn per sequence. Finished sequences continue with
    ``pad_token_id``; stops when all are finished or at ``max_length``. ``step`` as in
    :func:`beam_search` (``reorder`` is always ``None``).
    """
    if input_ids.shape[1] >= max_length:
        raise ValueError(f"the prompt already has {input_ids.shape[1]} tokens; max_length={max_length} leaves none")
    tokens = input_ids
    unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    while True:
        logits = _checked_logits(step(tokens, None), tokens).float()
        logits = _repetition_penalty(logits, tokens, repetition_penalty)
        logits = _forbid_eos(logits, tokens.shape[1], min_length, eos_token_id)
        if temperature != 1.0:
            logits = logits / temperature
        logits = _top_p_filter(_top_k_filter(logits, top_k), top_p)
        drawn = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        drawn = torch.where(unfinished, drawn, torch.full_like(drawn, pad_token_id))
        tokens = torch.cat([tokens, drawn[:, None]], dim=1)
        unfinished = unfinished & (drawn != eos_token_id)
        if not bool(unfinished.any()) or tokens.shape[1] >= max_length:
            return tokens


# ------------------------------------------------------------------------------------------------ units


def prunable_units(
    model: BertModel | BertLMHeadModel,
    modality: str = "text",
    prefix: str = "",
    cross_modality: str = "cross",
) -> list[Unit]:
    """Head-dim, head and neuron units of every layer, named by module path (with ``prefix``).

    Per layer: the self-attention (``attention.self``, ``modality``), the cross-attention
    (``crossattention.self`` or both ``self0``/``self1``, ``cross_modality``) and the FFN
    (``intermediate``, ``modality``). Slicing an attention unit also slices its output dense; an
    LM-head model is addressed through its ``bert.`` prefix. The LM head and NLVR2's ``merge_layer``
    are never pruned.
    """
    if isinstance(model, BertLMHeadModel):
        model, prefix = model.bert, f"{prefix}bert."
    units: list[Unit] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, SkippedBlock):
            continue
        base = f"{prefix}encoder.layer.{i}"
        units += module_units(f"{base}.attention.self", layer.attention.self, modality)
        ca = layer.crossattention
        if isinstance(ca, BertTwinCrossAttention):
            units += module_units(f"{base}.crossattention.self0", ca.self0, cross_modality)
            units += module_units(f"{base}.crossattention.self1", ca.self1, cross_modality)
        elif ca is not None:
            units += module_units(f"{base}.crossattention.self", ca.self, cross_modality)
        ffn = layer.intermediate
        units.append(Unit(f"{base}.intermediate", ffn, "neuron", ffn.hidden, modality, ffn.param_cost()))
    return units
