"""Vision transformer (BLIP's image encoder, DeiT) built from the prunable blocks.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.*``,
``norm``, ``head``; ``dist_token``/``head_dist`` for distilled DeiT), so timm, DeiT and BLIP visual
encoder state dicts load with ``strict=True``. Per-block ``heads``/``head_dims``/``mlp_hidden`` make a
compressed model an ordinary model with other widths.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, SkippedBlock, Unit, checkpoint_last_blocks, module_units
from .token_state import TokenState

if TYPE_CHECKING:
    from .cost import Probe

__all__ = ["PatchEmbed", "VisionTransformer", "prunable_units", "resample_pos_embed", "vit_config", "vit_variant"]

_PRESETS: dict[str, dict[str, int]] = {
    "base": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "deit_tiny": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "deit_small": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "deit_base": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
}


# timm's DeiT model names: (preset, distilled, native image size). The official deit_*.pth files and timm's
# ``.fb_in1k`` weights carry these names; a distilled file has a distillation token and head (spec uvc_deit §6).
_TIMM_NAMES: dict[str, tuple[str, bool, int]] = {
    **{f"deit_{s}_patch16_224": (f"deit_{s}", False, 224) for s in ("tiny", "small", "base")},
    **{f"deit_{s}_distilled_patch16_224": (f"deit_{s}", True, 224) for s in ("tiny", "small", "base")},
    "deit_base_patch16_384": ("deit_base", False, 384),
    "deit_base_distilled_patch16_384": ("deit_base", True, 384),
}


def vit_config(name: str) -> dict[str, int]:
    """Architecture keyword arguments of a named preset or timm DeiT name (image size, head and distillation
    token are the caller's: see :func:`vit_variant`)."""
    preset = _TIMM_NAMES[name][0] if name in _TIMM_NAMES else name
    if preset not in _PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(_PRESETS) + sorted(_TIMM_NAMES)}")
    return dict(_PRESETS[preset])


def vit_variant(name: str) -> dict[str, Any]:
    """What a model name fixes besides the widths: ``distilled`` and the native ``img_size`` (224 for the
    presets, 384 for the ``*_384`` DeiTs)."""
    vit_config(name)  # an unknown name is an error here too
    _, distilled, size = _TIMM_NAMES.get(name, (name, False, 224))
    return {"distilled": distilled, "img_size": size}


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: int | Sequence[int],
    num_prefix_tokens: int = 1,
    old_grid: int | Sequence[int] | None = None,
) -> Tensor:
    """Resize a learned (1, prefix + h*w, D) position embedding to another patch grid.

    The prefix rows (CLS, distillation token) are kept as they are; the row-major grid is resized
    with bicubic interpolation, ``align_corners=False`` and no antialiasing, as BLIP's checkpoint
    loader does (timm's ``resample_abs_pos_embed`` antialiases by default, which uses another
    kernel). ``old_grid`` defaults to a square grid.
    """
    new_h, new_w = _pair(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} position tokens do not form a square grid; pass old_grid")
        old_h = old_w = side
    else:
        old_h, old_w = _pair(old_grid)
        if old_h * old_w != n:
            raise ValueError(f"old_grid {old_h}x{old_w} does not match {n} position tokens")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patches, flattened row-major (y outer, x inner)."""

    def __init__(
        self, img_size: int | Sequence[int], patch_size: int, in_chans: int, embed_dim: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def _per_block(values: Sequence[int] | None, default: int, depth: int, what: str) -> list[int]:
    if values is None:
        return [default] * depth
    values = [int(v) for v in values]
    if len(values) != depth:
        raise ValueError(f"{what} lists {len(values)} blocks but depth is {depth}")
    return values


class VisionTransformer(nn.Module):
    """Pre-norm ViT returning all tokens after the final norm, or logits of a classification head.

    ``heads``, ``head_dims`` and ``mlp_hidden`` give per-block widths (``None``: uniform
    ``num_heads``, ``embed_dim // num_heads`` and ``embed_dim * mlp_ratio``). ``distilled`` adds
    DeiT's distillation token and head (timm ``VisionTransformerDistilled`` semantics). The attention
    scale of every block is fixed at ``(embed_dim // num_heads) ** -0.5`` regardless of
    ``head_dims``: compressed BLIP ViTs and DeiTs keep the dense scale (UPop). OpenAI CLIP's image tower
    differs only in ``pre_norm`` (a LayerNorm after the position embedding, timm's ``norm_pre``), a patch
    convolution without bias (``patch_bias``), QuickGELU (``act``) and LayerNorm eps 1e-5. ``drop_rate`` is the
    dropout after the attention projection and in the MLP (timm's ``drop``; ViLT's blocks).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        num_classes: int = 0,
        global_pool: str = "token",
        norm_eps: float = 1e-6,
        heads: Sequence[int] | None = None,
        head_dims: Sequence[int] | None = None,
        mlp_hidden: Sequence[int] | None = None,
        distilled: bool = False,
        pre_norm: bool = False,
        patch_bias: bool = True,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"only global_pool='token' is supported, got {global_pool!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.distilled = distilled
        self.distilled_training = False
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else None

        dense_head_dim = embed_dim // num_heads
        heads = _per_block(heads, num_heads, depth, "heads")
        head_dims = _per_block(head_dims, dense_head_dim, depth, "head_dims")
        mlp_hidden = _per_block(mlp_hidden, int(embed_dim * mlp_ratio), depth, "mlp_hidden")
        # Plain Python (not torch.linspace) so the model can also be built on the meta device.
        drop_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                heads[i],
                head_dim=head_dims[i],
                mlp_hidden=mlp_hidden[i],
                qkv_bias=qkv_bias,
                drop_path=drop_rates[i],
                proj_drop=drop_rate,
                norm_eps=norm_eps,
                act=act,
                index=i,
            )
            for i in range(depth)
        )
        for block in self.blocks:
            block.attn.scale = dense_head_dim**-0.5
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def set_grad_checkpointing(self, enable: bool = True, last_k: int | None = None) -> None:
        """Checkpoint the attention and MLP of the last ``last_k`` blocks (all when ``None``)."""
        checkpoint_last_blocks(self.blocks, enable, last_k)

    def block_widths(self) -> dict[str, list[int]]:
        """Per-block widths; passed back to the constructor they rebuild this architecture."""
        return {
            "heads": [b.attn.num_heads for b in self.blocks],
            "head_dims": [b.attn.head_dim for b in self.blocks],
            "mlp_hidden": [b.mlp.hidden for b in self.blocks],
        }

    def _pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, self.num_prefix_tokens, self.patch_embed.grid_size)

    def forward_tokens(
        self, x: Tensor, state: TokenState | None = None, record_attn: Iterable[int] = ()
    ) -> tuple[Tensor, TokenState]:
        """All tokens after the final norm, (B, prefix + N, D), and their :class:`TokenState`; N shrinks
        when token hooks reduce the tokens.

        Images of another size get the position embedding resampled to their patch grid. ``record_attn``
        lists blocks whose attention probabilities are kept in ``state.maps`` (BLIP's ``register_blk``, e.g.
        for Grad-CAM).
        """
        x, grid = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self._pos_embed_for(grid)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        state = TokenState.start(record=record_attn) if state is None else state
        for block in self.blocks:
            x, state = block(x, state)
        return self.norm(x), state

    def forward_features(self, x: Tensor, record_attn: Iterable[int] = ()) -> Tensor:
        """All tokens after the final norm (see :meth:`forward_tokens`)."""
        return self.forward_tokens(x, record_attn=record_attn)[0]

    def forward_head(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Class logits from the CLS token; distilled models average both heads unless training with
        ``distilled_training`` set, when they return ``(class_logits, distillation_logits)``."""
        if self.num_classes == 0:
            return x
        logits = self.head(x[:, 0])
        if not self.distilled:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits when the model has a head (``num_classes > 0``), else all features."""
        return self.forward_head(self.forward_features(x))

    def cost_probe(self, kind: str = "seed", batch: Any = None, dataset: Any = None, batch_size: int = 1) -> Probe:
        """What the classifier is fed when counted (``seed``: one image, as DeiT's FLOPs; ``batch``: an
        evaluation batch) or timed (``speed``: ``batch_size`` images), with the call's analytic cost."""
        if kind == "batch":
            if batch is None:
                raise ValueError("a batch probe needs a batch of the evaluation loader")
            return _classification_probe(self, batch[0].to(self.pos_embed.device))
        if kind not in ("seed", "speed"):
            raise ValueError(f"unknown probe kind {kind!r}; choose from ('seed', 'batch', 'speed')")
        from models.cost import random_images

        return _classification_probe(self, random_images(self, 1 if kind == "seed" else batch_size))


def _classification_probe(vit: VisionTransformer, images: Tensor) -> Probe:
    from models.cost import Probe, vit_cost

    n = images.shape[0]
    what = f"{n} image(s) {'x'.join(map(str, images.shape[-2:]))}; inference logits"
    grid = (images.shape[-2] // vit.patch_embed.patch_size[0], images.shape[-1] // vit.patch_embed.patch_size[1])
    return Probe(lambda: vit(images), n, what, analytic=lambda: vit_cost(vit, n, grid, head_rows=n)[0])


def prunable_units(vit: VisionTransformer, modality: str = "vision", prefix: str = "") -> list[Unit]:
    """Head-dim, head and neuron units of every block, named by module path (with ``prefix``)."""
    units: list[Unit] = []
    for i, block in enumerate(vit.blocks):
        if isinstance(block, SkippedBlock):
            continue
        units += module_units(f"{prefix}blocks.{i}.attn", block.attn, modality)
        units += module_units(f"{prefix}blocks.{i}.mlp", block.mlp, modality)
    return units
