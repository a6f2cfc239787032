"""State dicts laid out exactly like the official BLIP checkpoint files, at any size.

The key grammar (names, order and shapes) follows the released task models: a timm ViT under
``visual_encoder.`` (and ``visual_encoder_m.``), HF-4.15 BERT towers with cross-attention under
``text_encoder.``, ``text_encoder_m.`` and ``text_decoder.bert.``, the LM head under
``text_decoder.cls.predictions.``, NLVR2's twin cross-attention, projections, heads, ``temp`` and the
contrastive queues. Keys appear in the order ``nn.Module.state_dict`` gives them for the original
modules: a module's own parameters, then its own buffers, then its children in registration order.

``official_layout`` gives key -> shape (base sizes by default, usable as a fixture for a real model's
``state_dict``); ``official_state_dict`` fills a scaled-down layout with random tensors, with the
official tensor sharing (tied LM head, and in pretrained files the text decoder sharing everything
but self-attention with the text encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TASKS", "official_keys", "official_layout", "official_state_dict"]

TASKS = ("retrieval", "nlvr", "vqa", "caption", "pretrain")

# Resolution the released files were saved at (pos_embed rows = 1 + (size / 16)^2).
BASE_IMAGE_SIZE = {"retrieval": 384, "nlvr": 384, "vqa": 480, "caption": 384, "pretrain": 224}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class _Dims:
    width: int  # text hidden size
    vision_width: int  # ViT width = cross-attention key/value width of image-grounded towers
    depth_v: int
    depth_t: int
    mlp: int
    mlp_v: int
    vocab: int
    max_positions: int
    tokens: int  # pos_embed rows
    patch: int
    embed_dim: int
    queue_size: int
    merge_from: int  # first NLVR2 layer with a merge_layer


def _vit(prefix: str, d: _Dims) -> dict[str, Shape]:
    w, h = d.vision_width, d.mlp_v
    out: dict[str, Shape] = {
        f"{prefix}cls_token": (1, 1, w),
        f"{prefix}pos_embed": (1, d.tokens, w),
        f"{prefix}patch_embed.proj.weight": (w, 3, d.patch, d.patch),
        f"{prefix}patch_embed.proj.bias": (w,),
    }
    for i in range(d.depth_v):
        b = f"{prefix}blocks.{i}."
        out |= {
            f"{b}norm1.weight": (w,),
            f"{b}norm1.bias": (w,),
            f"{b}attn.qkv.weight": (3 * w, w),
            f"{b}attn.qkv.bias": (3 * w,),
            f"{b}attn.proj.weight": (w, w),
            f"{b}attn.proj.bias": (w,),
            f"{b}norm2.weight": (w,),
            f"{b}norm2.bias": (w,),
            f"{b}mlp.fc1.weight": (h, w),
            f"{b}mlp.fc1.bias": (h,),
            f"{b}mlp.fc2.weight": (w, h),
            f"{b}mlp.fc2.bias": (w,),
        }
    return out | {f"{prefix}norm.weight": (w,), f"{prefix}norm.bias": (w,)}


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _layer_norm(prefix: str, width: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _attention_qkv(prefix: str, width: int, kv_width: int) -> dict[str, Shape]:
    return (
        _linear(f"{prefix}.query", width, width)
        | _linear(f"{prefix}.key", width, kv_width)
        | _linear(f"{prefix}.value", width, kv_width)
    )


def _bert(prefix: str, d: _Dims, kv_width: int, twin: bool = False) -> dict[str, Shape]:
    w = d.width
    out: dict[str, Shape] = {
        f"{prefix}embeddings.position_ids": (1, d.max_positions),
        f"{prefix}embeddings.word_embeddings.weight": (d.vocab, w),
        f"{prefix}embeddings.position_embeddings.weight": (d.max_positions, w),
        **_layer_norm(f"{prefix}embeddings.LayerNorm", w),
    }
    for i in range(d.depth_t):
        layer = f"{prefix}encoder.layer.{i}."
        out |= _attention_qkv(f"{layer}attention.self", w, w)
        out |= _linear(f"{layer}attention.output.dense", w, w) | _layer_norm(f"{layer}attention.output.LayerNorm", w)
        cross = f"{layer}crossattention."
        if twin:
            # nlvr_encoder.BertSelfOutput registers LayerNorm before the two projections.
            out |= _attention_qkv(f"{cross}self0", w, kv_width) | _attention_qkv(f"{cross}self1", w, kv_width)
            out |= _layer_norm(f"{cross}output.LayerNorm", w)
            out |= _linear(f"{cross}output.dense0", w, w) | _linear(f"{cross}output.dense1", w, w)
            if i >= d.merge_from:
                out |= _linear(f"{cross}output.merge_layer", w, 2 * w)
        else:
            out |= _attention_qkv(f"{cross}self", w, kv_width)
            out |= _linear(f"{cross}output.dense", w, w) | _layer_norm(f"{cross}output.LayerNorm", w)
        out |= _linear(f"{layer}intermediate.dense", d.mlp, w)
        out |= _linear(f"{layer}output.dense", w, d.mlp) | _layer_norm(f"{layer}output.LayerNorm", w)
    return out


def _lm_decoder(d: _Dims, kv_width: int) -> dict[str, Shape]:
    head = "text_decoder.cls.predictions."
    return (
        _bert("text_decoder.bert.", d, kv_width)
        | {f"{head}bias": (d.vocab,)}
        | _linear(f"{head}transform.dense", d.width, d.width)
        | _layer_norm(f"{head}transform.LayerNorm", d.width)
        | {f"{head}decoder.weight": (d.vocab, d.width), f"{head}decoder.bias": (d.vocab,)}
    )


def _contrastive(d: _Dims, buffers: tuple[str, ...]) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """(own parameters and buffers of the model, its child modules), in registration order."""
    own: dict[str, Shape] = {"temp": (), "image_queue": (d.embed_dim, d.queue_size)}
    own["text_queue"] = (d.embed_dim, d.queue_size)
    for name in buffers:
        own[name] = (1, d.queue_size) if name == "idx_queue" else (1,)
    children = (
        _vit("visual_encoder.", d)
        | _bert("text_encoder.", d, d.vision_width)
        | _linear("vision_proj", d.embed_dim, d.vision_width)
        | _linear("text_proj", d.embed_dim, d.width)
        | _linear("itm_head", 2, d.width)
        | _vit("visual_encoder_m.", d)
        | _linear("vision_proj_m", d.embed_dim, d.vision_width)
        | _bert("text_encoder_m.", d, d.vision_width)
        | _linear("text_proj_m", d.embed_dim, d.width)
    )
    return own, children


def _layout(task: str, d: _Dims) -> dict[str, Shape]:
    if task == "retrieval":
        own, children = _contrastive(d, ("idx_queue", "ptr_queue"))
        return own | children
    if task == "pretrain":
        own, children = _contrastive(d, ("queue_ptr",))
        return own | children | _lm_decoder(d, d.vision_width)
    if task == "nlvr":
        return (
            _vit("visual_encoder.", d)
            | _bert("text_encoder.", d, d.vision_width, twin=True)
            | _linear("cls_head.0", d.width, d.width)
            | _linear("cls_head.2", 2, d.width)
        )
    if task == "vqa":
        # The answer decoder attends to the question encoder, hence text-width keys and values.
        return _vit("visual_encoder.", d) | _bert("text_encoder.", d, d.vision_width) | _lm_decoder(d, d.width)
    if task == "caption":
        return _vit("visual_encoder.", d) | _lm_decoder(d, d.vision_width)
    raise ValueError(f"unknown BLIP task {task!r}; choose from {TASKS}")


def _dims(
    task: str,
    *,
    width: int,
    depth: int,
    depth_t: int | None,
    heads: int,
    mlp: int,
    vocab: int,
    image_size: int | None,
    patch: int,
    queue_size: int,
    encoder_width: int | None,
    embed_dim: int,
    max_positions: int,
    merge_from: int | None,
) -> _Dims:
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    vision_width = width if encoder_width is None else encoder_width
    size = BASE_IMAGE_SIZE[task] if image_size is None else image_size
    if size % patch:
        raise ValueError(f"image_size {size} is not a multiple of patch {patch}")
    depth_t = depth if depth_t is None else depth_t
    return _Dims(
        width=width,
        vision_width=vision_width,
        depth_v=depth,
        depth_t=depth_t,
        mlp=mlp,
        mlp_v=mlp * vision_width // width,
        vocab=vocab,
        max_positions=max_positions,
        tokens=1 + (size // patch) ** 2,
        patch=patch,
        embed_dim=embed_dim,
        queue_size=queue_size,
        # Official: layers 6..11 of 12; scaled-down towers keep the same half/half split.
        merge_from=depth_t // 2 if merge_from is None else merge_from,
    )


def official_layout(
    task: str,
    *,
    width: int = 768,
    depth: int = 12,
    depth_t: int | None = None,
    heads: int = 12,
    mlp: int = 3072,
    vocab: int = 30524,
    image_size: int | None = None,
    patch: int = 16,
    queue_size: int = 57600,
    encoder_width: int | None = None,
    embed_dim: int = 256,
    max_positions: int = 512,
    merge_from: int | None = None,
) -> dict[str, Shape]:
    """Key -> shape of an official ``task`` file; defaults are ViT-B/BERT-base at the file's resolution.

    ``depth`` is the ViT depth and, unless ``depth_t`` is given, the text depth. ``encoder_width`` is
    the ViT width (default ``width``; 1024 for ViT-L, whose MLP is then scaled alike). ``image_size``
    defaults to the resolution each released file was saved at.
    """
    return _layout(
        task,
        _dims(
            task,
            width=width,
            depth=depth,
            depth_t=depth_t,
            heads=heads,
            mlp=mlp,
            vocab=vocab,
            image_size=image_size,
            patch=patch,
            queue_size=queue_size,
            encoder_width=encoder_width,
            embed_dim=embed_dim,
            max_positions=max_positions,
            merge_from=merge_from,
        ),
    )


def official_keys(task: str, depth_v: int = 12, depth_t: int = 12) -> list[str]:
    """The exact key list (in file order) of an official ``task`` checkpoint."""
    return list(official_layout(task, depth=depth_v, depth_t=depth_t))


def official_state_dict(
    task: str,
    *,
    width: int = 16,
    depth: int = 2,
    depth_t: int | None = None,
    heads: int = 2,
    mlp: int = 32,
    vocab: int = 30,
    image_size: int = 32,
    patch: int = 16,
    queue_size: int = 8,
    encoder_width: int | None = None,
    embed_dim: int = 8,
    max_positions: int = 12,
    merge_from: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A scaled-down state dict with exactly the keys of the official ``task`` file.

    Float tensors are random (distinct per key); ``position_ids`` are int64 ``arange`` rows; the queues
    are L2-normalised along dim 0; ``idx_queue`` holds image ids and the queue pointer an offset. The LM
    head's ``decoder.weight``/``decoder.bias`` are the very tensors of the decoder word embeddings and
    ``predictions.bias``, as in the released files; wrap the result as ``{"model": sd}`` for the
    container format.
    """
    layout = official_layout(
        task,
        width=width,
        depth=depth,
        depth_t=depth_t,
        heads=heads,
        mlp=mlp,
        vocab=vocab,
        image_size=image_size,
        patch=patch,
        queue_size=queue_size,
        encoder_width=encoder_width,
        embed_dim=embed_dim,
        max_positions=max_positions,
        merge_from=merge_from,
    )
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for key, shape in layout.items():
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[-1], dtype=torch.int64).unsqueeze(0)
        elif key == "idx_queue":
            sd[key] = torch.randint(0, 1000, shape, generator=g, dtype=torch.int64)
        elif key in ("ptr_queue", "queue_ptr"):
            sd[key] = torch.randint(0, queue_size, shape, generator=g, dtype=torch.int64)
        elif key in ("image_queue", "text_queue"):
            sd[key] = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=0)
        elif key == "temp":
            sd[key] = torch.tensor(0.05 + 0.05 * torch.rand((), generator=g).item())
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.5
    if task == "pretrain":
        # tie_encoder_decoder_weights: the decoder shares every weight but self-attention with the encoder.
        for key in sd:
            if key.startswith("text_decoder.bert.") and ".attention." not in key and "position_ids" not in key:
                sd[key] = sd["text_encoder." + key[len("text_decoder.bert.") :]]
    head = "text_decoder.cls.predictions."
    if f"{head}decoder.weight" in sd:
        sd[f"{head}decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
        sd[f"{head}decoder.bias"] = sd[f"{head}bias"]
    return sd
