"""What the four BLIP task models share: the image encoder, the text configs, the tokenizer.

Every BLIP model takes raw strings and tokenises them itself (as the original does), so tasks and
pruners never see token ids. Parameter names are the official ones, so released files load without
key maps (``models/checkpoints.py`` applies the loading policies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from models.med import MedConfig
from models.tokenizer import init_tokenizer
from models.vit import VisionTransformer, vit_config

# Config keys of every BLIP task (with their defaults). ``vit_*`` overrides shrink the preset for demos.
BLIP_DEFAULTS: dict[str, Any] = {
    "vit": "base",
    "vit_grad_ckpt": False,
    "vit_ckpt_layer": 0,
    "vit_drop_path": None,  # None: the task's seed default (0.1 for NLVR2 and VQA, else 0)
    "vit_patch_size": None,
    "vit_embed_dim": None,
    "vit_depth": None,
    "vit_heads": None,
    "med_config": "configs/med_config.json",
    "tokenizer": "pretrained/bert-base-uncased",
}


def create_vit(
    config: Mapping[str, Any], image_size: int, drop_path_rate: float = 0.0
) -> tuple[VisionTransformer, int]:
    """BLIP's ``create_vit``: the preset named by ``config['vit']`` at ``image_size``, returning (vit, width).

    The seed's ViT-L builder always uses drop-path 0.1 (it ORs the caller's rate with a truthy
    constant); that is kept, because the released ViT-L numbers were trained with it.
    """
    name = config["vit"]
    if name not in ("base", "large"):
        raise ValueError(f"vit must be 'base' or 'large', got {name!r}")
    arch = vit_config(name)
    for key, arch_key in (
        ("vit_patch_size", "patch_size"),
        ("vit_embed_dim", "embed_dim"),
        ("vit_depth", "depth"),
        ("vit_heads", "num_heads"),
    ):
        if config.get(key) is not None:
            arch[arch_key] = config[key]
    rate = config.get("vit_drop_path")
    rate = drop_path_rate if rate is None else rate
    if name == "large":
        rate = rate or 0.1
    vit = VisionTransformer(img_size=image_size, num_classes=0, drop_path_rate=rate, **arch)
    if config.get("vit_grad_ckpt"):
        vit.set_grad_checkpointing(True, last_k=config.get("vit_ckpt_layer", 0))
    return vit, arch["embed_dim"]


def encode_image(vit: VisionTransformer, image: Tensor) -> tuple[Tensor, Tensor]:
    """Image tokens (B, N', D) and their 0/1 padding mask (B, N') for the cross-attention that reads them:
    the image's token state goes with its tokens, whatever the ViT's token hooks did to them."""
    embeds, state = vit.forward_tokens(image)
    return embeds, state.padding_mask(embeds)


def med_config(config: Mapping[str, Any], tokenizer, encoder_width: int, **overrides: Any) -> MedConfig:
    """The MED config file with the vocabulary size of ``tokenizer`` and the image width for cross-attention."""
    return MedConfig.from_json_file(
        config["med_config"], vocab_size=len(tokenizer), encoder_width=encoder_width, **overrides
    )


def build_tokenizer(config: Mapping[str, Any]):
    return init_tokenizer(config["tokenizer"])


def tokenize(tokenizer, text: list[str], device: torch.device, *, first: int | None = None, **kw) -> Any:
    """Tokenise to ``device``; ``first`` replaces the first token ([CLS]) by e.g. [ENC] or [DEC]."""
    out = tokenizer(text, return_tensors="pt", **kw).to(device)
    if first is not None:
        out.input_ids = out.input_ids.clone()
        out.input_ids[:, 0] = first
    return out


def lm_targets(tokenizer, ids: Tensor, prompt_length: int = 0) -> Tensor:
    """Decoder labels: padding and the first ``prompt_length`` positions are ignored (-100)."""
    targets = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    targets[:, :prompt_length] = -100
    return targets


def decoder_batch(tokenizer, text: list[str], device: torch.device, max_length: int, prompt_length: int = 0):
    """Decoder inputs for LM training ([DEC] first, padded to the longest, truncated) and their labels."""
    tokens = tokenize(
        tokenizer, text, device, first=tokenizer.bos_token_id, padding="longest", truncation=True, max_length=max_length
    )
    return tokens, lm_targets(tokenizer, tokens.input_ids, prompt_length)


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """All ranks' tensors concatenated along dim 0 (no gradient); the tensor itself when not distributed."""
    if not torch.distributed.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces the incoming gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        n = grad.shape[0] // torch.distributed.get_world_size()
        r = torch.distributed.get_rank()
        return grad[r * n : (r + 1) * n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def copy_params(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Momentum towers start as (and UPop resets them to) copies of the online towers."""
    for online, momentum in pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            p_m.data.copy_(p.data)
            p_m.requires_grad = False


@torch.no_grad()
def momentum_update(pairs: list[tuple[nn.Module, nn.Module]], m: float) -> None:
    for online, momentum in pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            p_m.data.mul_(m).add_(p.data, alpha=1.0 - m)


def tower_units(model: nn.Module, towers: tuple[str, ...], momentum: bool = False) -> list:
    """Prunable units of a BLIP task model's towers, named by module path.

    The ViT is ``vision``; an encoder's self-attention and FFN are ``text``, a decoder's ``decoder``;
    every cross-attention is ``cross``. ``momentum`` adds each tower's ``<name>_m`` twin where one exists
    (they are never searched, but a compressed checkpoint holds them at the pruned widths).
    """
    from models import med, vit

    names = list(towers)
    if momentum:
        names += [f"{t}_m" for t in towers if hasattr(model, f"{t}_m")]
    units = []
    for name in names:
        tower = getattr(model, name)
        if isinstance(tower, VisionTransformer):
            units += vit.prunable_units(tower, "vision", prefix=f"{name}.")
        elif isinstance(tower, med.BertLMHeadModel):
            units += med.prunable_units(tower, "decoder", prefix=f"{name}.")
        else:
            units += med.prunable_units(tower, "text", prefix=f"{name}.")
    return units


class PrunableTowers:
    """Mixin of BLIP task models: ``prunable_units()`` over the towers named in ``TOWERS``, and the model's cost
    probes (:mod:`models.blip_probes`)."""

    TOWERS: tuple[str, ...] = ()

    def prunable_units(self, momentum: bool = False) -> list:
        return tower_units(self, self.TOWERS, momentum)

    def cost_probe(self, kind: str = "seed", batch: Any = None, dataset: Any = None, batch_size: int = 1):
        """What the model is fed when counted (``seed``: the seed's dummy inputs; ``batch``: an evaluation batch)
        or timed (``speed``: ``batch_size`` samples), with the same call's analytic cost."""
        from models.blip_probes import blip_probe

        return blip_probe(self, kind, batch, dataset, batch_size)
