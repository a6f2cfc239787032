"""UVC's released DeiT checkpoints (VITA-Group/UVC) as ordinary compressed DeiTs.

UVC never materialises its result (spec uvc_deit.md section 4). A stage-1 (``joint_train.py``) or stage-2
(``post_train.py``) file is a plain state dict of the dense ``DistilledVisionTransformer`` (``save_model`` writes
``model.module.state_dict()``: no wrapper, no DDP prefix) under timm's names, plus

* a ``mask`` buffer, shaped like the weight, beside every module weight (``patch_embed.proj``, ``blocks.{i}.norm1``
  / ``norm2``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` / ``fc2``, ``norm``, ``head``, ``head_dist``, ``gumbel``),
  multiplied into the weight before every stage-2 forward; pruning zeroes only whole ``attn.proj`` columns (all of
  a head's, or single value coordinates) and ``mlp.fc2`` columns with the matching ``fc1`` rows; biases are never
  masked;
* ``block_skip_gating`` (depth, 2): gate logits (skip, execute); stage 2 runs block ``i`` iff execute > skip;
* parameters stage 2 never uses, dropped here: the token scorer ``gumbel.*`` (only with ``tau > 0``), the
  per-position ``patch_gating`` (patch mode 1; post_train builds no patch gates, trap 6) and every block's
  ``attn_skip_gating`` / ``mlp_skip_gating`` (part gating, which no script switches on).

A distilled file (``enable_deit 1``, the README's deit-tiny-distilled release) adds ``dist_token`` and ``head_dist``;
its ``pos_embed`` has one token more.

:func:`convert_uvc_state_dict` multiplies the masks in, then deletes what they and the gates make dead (spec section
4 [design]): a head whose ``proj`` columns are all masked (its q, k, v rows and proj columns); in a kept head, the
value rows of its masked proj columns (uneven value widths: queries and keys keep the full head width and the
scale stays ``(embed_dim / num_heads) ** -0.5``); the neurons whose ``fc2`` column is masked; the blocks whose gates
say skip. The result is exact (a masked column multiplies a dead value or neuron by zero) and loads like any
compressed file of this project: :func:`models.arch.apply_architecture` on a dense
:class:`~models.vit.VisionTransformer`, then ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.arch import architecture, skip_blocks
from models.vit import VisionTransformer
from utils import CheckpointError, load_checkpoint_file, log, unwrap_state_dict

__all__ = [
    "HEADS_BY_WIDTH",
    "convert_uvc_state_dict",
    "cut_block",
    "is_uvc_state_dict",
    "load_uvc_checkpoint",
]

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12}  # UVC's CONFIGS: DeiT tiny, small, base (head width 64)
GATES = "block_skip_gating"
_UNUSED = re.compile(r"(gumbel\..+|patch_gating|blocks\.\d+\.(attn|mlp)_skip_gating)$")
_PRUNING_MASK = re.compile(r"blocks\.\d+\.(attn\.proj|mlp\.fc2)\.mask$")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def is_uvc_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` (with or without a DDP ``module.`` prefix) has UVC's layout: block gates and/or the mask
    buffers of the pruned layers."""
    return any(k.removeprefix("module.") == GATES or _PRUNING_MASK.match(k.removeprefix("module.")) for k in sd)


def _preview(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _geometry(sd: Mapping[str, Tensor], source: str, num_heads: int | None) -> dict[str, Any]:
    """Constructor arguments of the dense :class:`~models.vit.VisionTransformer` the file was trained as."""

    def need(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"{source} has no {key}; a UVC DeiT state dict has one")
        return sd[key]

    embed_dim = int(need("cls_token").shape[-1])
    conv = need("patch_embed.proj.weight")  # (D, C, p, p)
    indices = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    depth = len(indices)
    if not depth or indices != list(range(depth)):
        raise CheckpointError(f"{source}: blocks must be numbered 0..depth-1, found {indices}")
    if num_heads is None:
        if embed_dim not in HEADS_BY_WIDTH:
            raise CheckpointError(
                f"{source}: embed_dim {embed_dim} is not a DeiT width of UVC's configs {HEADS_BY_WIDTH}; pass num_heads"
            )
        num_heads = HEADS_BY_WIDTH[embed_dim]
    if embed_dim % num_heads:
        raise CheckpointError(f"{source}: embed_dim {embed_dim} is not divisible by {num_heads} heads")
    distilled = "dist_token" in sd
    patches = int(need("pos_embed").shape[1]) - (2 if distilled else 1)
    side = math.isqrt(patches)
    if side * side != patches:
        raise CheckpointError(f"{source}: pos_embed holds {patches} patch positions, not a square grid")
    head = sd.get("head.weight")
    return {
        "img_size": (side * conv.shape[-2], side * conv.shape[-1]),
        "patch_size": (conv.shape[-2], conv.shape[-1]),
        "in_chans": int(conv.shape[1]),
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_hidden": [int(need(f"blocks.{i}.mlp.fc1.weight").shape[0]) for i in range(depth)],
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "num_classes": 0 if head is None else int(head.shape[0]),
        "distilled": distilled,
    }


def _live_columns(mask: Tensor | None, width: int) -> Tensor:
    """Input columns of a Linear that its mask does not zero entirely (all live without a mask)."""
    if mask is None:
        return torch.ones(width, dtype=torch.bool)
    return mask.ne(0).any(0).cpu()


def cut_block(block: nn.Module, value_live: Tensor, neurons_live: Tensor) -> tuple[int, list[int], int]:
    """Delete, in place, what masked ``proj`` columns (``value_live``: (heads * head_dim,) bool) and masked ``fc2``
    columns (``neurons_live``: (hidden,) bool) leave dead in a :class:`~models.layers.Block`: heads without a live
    column, the value rows of dead columns in the other heads, dead neurons. Returns (heads, value widths, neurons)
    kept; ``ValueError`` if nothing of the attention or the MLP would be left."""
    attn, mlp = block.attn, block.mlp
    live = value_live.view(attn.num_heads, attn.head_dim)
    heads = live.any(1).nonzero().flatten()
    if heads.numel() == 0:
        raise ValueError(f"every head's proj columns are masked ({attn.num_heads} heads)")
    if not neurons_live.any():
        raise ValueError(f"every fc2 column is masked ({mlp.hidden} neurons)")
    if heads.numel() < attn.num_heads:
        attn.keep_heads(heads)
    dims = [live[h].nonzero().flatten() for h in heads.tolist()]
    if any(d.numel() < attn.head_dim for d in dims):
        attn.keep_value_dims(dims)
    if not neurons_live.all():
        mlp.keep_neurons(neurons_live.nonzero().flatten())
    return attn.num_heads, [int(d.numel()) for d in dims], mlp.hidden


def convert_uvc_state_dict(
    sd: Mapping[str, Any], source: str = "the state dict", num_heads: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, architecture description) of the materialised model a UVC state dict describes.

    ``sd`` may carry a DDP ``module.`` prefix or a ``{'model': sd}`` wrapper. The head count comes from
    ``num_heads`` or, by ``embed_dim``, from UVC's DeiT configs. Errors name ``source`` and the offending keys: a mask
    without its weight or of another shape, keys that are neither DeiT parameters nor UVC's, missing DeiT
    parameters, gates of the wrong shape, a kept block whose masks remove every head or every neuron.
    """
    sd = unwrap_state_dict(sd, source)
    geo = _geometry(sd, source, num_heads)
    with torch.device("meta"):  # shapes only: the file's tensors are assigned below
        model = VisionTransformer(**geo)
    expected = set(model.state_dict())

    masks = {k.removesuffix(".mask"): v for k, v in sd.items() if k.endswith(".mask") and not _UNUSED.match(k)}
    weights = {k: v for k, v in sd.items() if k in expected}
    for module, mask in masks.items():
        key = f"{module}.weight"
        if key not in weights:
            raise CheckpointError(f"{source}: mask {module}.mask has no weight {key} in the model")
        if mask.shape != weights[key].shape:
            raise CheckpointError(
                f"{source}: mask {module}.mask has shape {tuple(mask.shape)} but {key} has {tuple(weights[key].shape)}"
            )
        weights[key] = weights[key] * mask.to(weights[key].dtype)

    uvc_only = {GATES, *(k for k in sd if k.endswith(".mask") or _UNUSED.match(k))}
    problems = {
        "unknown keys": sorted(set(sd) - expected - uvc_only),
        "missing keys": sorted(expected - set(weights)),
    }
    if any(problems.values()):
        raise CheckpointError(
            f"{source} is not a UVC DeiT state dict of this geometry "
            f"(embed_dim {geo['embed_dim']}, depth {geo['depth']}, {geo['num_heads']} heads): "
            + "; ".join(f"{what} {_preview(keys)}" for what, keys in problems.items() if keys)
        )
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: {e}") from None

    skipped: list[int] = []
    gates = sd.get(GATES)
    if gates is not None:
        if tuple(gates.shape) != (geo["depth"], 2):
            raise CheckpointError(f"{source}: {GATES} has shape {tuple(gates.shape)}, expected ({geo['depth']}, 2)")
        skipped = [i for i in range(geo["depth"]) if gates[i, 0] >= gates[i, 1]]  # the release runs iff execute > skip
    kept = {}
    for i, block in enumerate(model.blocks):
        if i in skipped:
            continue
        value_live = _live_columns(masks.get(f"blocks.{i}.attn.proj"), block.attn.inner_dim)
        neurons_live = _live_columns(masks.get(f"blocks.{i}.mlp.fc2"), block.mlp.hidden)
        try:
            kept[i] = cut_block(block, value_live, neurons_live)
        except ValueError as e:
            raise CheckpointError(
                f"{source}: block {i} is executed but {e} (blocks.{i}.attn.proj.mask / blocks.{i}.mlp.fc2.mask); "
                "UVC keeps at least one"
            ) from None
    skip_blocks(model, [f"blocks.{i}" for i in skipped], source)
    dropped = sorted(k for k in sd if _UNUSED.match(k))
    log.info(
        "%s: UVC checkpoint materialised; kept (heads, value widths, neurons) %s; skipped blocks %s; dropped %s",
        source,
        kept,
        skipped or "none",
        _preview(dropped, 4) if dropped else "nothing",
    )
    return dict(model.state_dict()), architecture(model)


def load_uvc_checkpoint(path: str | Path, num_heads: int | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a UVC ``.pth(.tar)`` with ``weights_only=True`` (a plain state dict, ``{'model': sd, ...}``, with or
    without ``module.``) and convert it (:func:`convert_uvc_state_dict`)."""
    sd = unwrap_state_dict(load_checkpoint_file(path), path)
    if not is_uvc_state_dict(sd):
        raise CheckpointError(
            f"{path} is not a UVC checkpoint: it has neither {GATES} nor "
            "blocks.*.attn.proj.mask / blocks.*.mlp.fc2.mask"
        )
    return convert_uvc_state_dict(sd, str(path), num_heads)
