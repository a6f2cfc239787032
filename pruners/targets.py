"""The Linear modules that PLATON masks and that ``compute_id`` measures, by name and modality.

The seed (Nofear18/ID_VL_Pruning) picks them twice, in two ways that agree only by luck: its pruners
match parameter names against substrings (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``,
``attention.self``, ``crossattention.self``, ``.attention.output.dense``,
``crossattention.output.dense``, ``intermediate.dense``, ``output.dense``, plus ``merge_layer`` for
NLVR2), and ComputeID takes every ``nn.Linear`` except the LM head. Here both read one list, built
from the model's structure:

* every Linear inside a block of a :class:`~models.vit.VisionTransformer` (``attn.qkv``,
  ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``): modality ``vision``;
* every Linear inside a layer of a MED :class:`~models.med.BertModel` (self-attention q/k/v and
  output dense, cross-attention q/k/v and output dense, or NLVR2's twin ``self0``/``self1``,
  ``dense0``/``dense1`` and ``merge_layer``, then ``intermediate.dense`` and ``output.dense``):
  modality ``text``. Cross-attention key/value project image tokens, but they belong to the text
  tower, as in the seed's tables (48 vision entries, then the text entries);
* in CLIP's two towers, each block's ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (the seed's ``out_proj``,
  ``c_fc``, ``c_proj``: its CLIP pruner never masks the fused q/k/v), vision then text: 3 x (24 + 12) = 108 on
  ViT-L/14;
* nothing else: embeddings, patch embedding, LayerNorms, the LM head, ``cls_head``, classifier
  heads, projections; and nothing in momentum towers (``*_m``), which never receive a gradient.

The order is module-registration order, the order of ``named_modules()`` and of the seed's
``result_id.txt``. BLIP caption gives 168 modules (48 + 12 x 10), BLIP NLVR2 222
(48 + 6 x 14 + 6 x 15), a DeiT/ViT classifier 4 per block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.med import BertLayer, BertModel
from models.vit import VisionTransformer

__all__ = ["TEXT", "VISION", "Target", "target_modules", "targets"]

VISION = "vision"
TEXT = "text"


@dataclass(frozen=True)
class Target:
    """One measured/masked Linear: its fully qualified module name, its modality, and what the
    token axis of its output indexes (``image`` for ViT blocks and cross-attention key/value,
    ``text`` for the other text-tower modules, whose length changes from batch to batch)."""

    name: str
    modality: str
    tokens: str


def _is_momentum(name: str) -> bool:
    return any(part.endswith("_m") for part in name.split("."))


def _cross_kv(layer: BertLayer, linear: nn.Linear) -> bool:
    """Whether ``linear`` is a key/value projection of ``layer``'s cross-attention."""
    cross = layer.crossattention
    if cross is None:
        return False
    heads = [getattr(cross, attr, None) for attr in ("self", "self0", "self1")]
    return any(h is not None and (linear is h.key or linear is h.value) for h in heads)


def targets(model: nn.Module) -> list[Target]:
    """The masked/measured Linear modules of ``model``, in registration order.

    Raises ``TypeError`` for a model that holds no ViT blocks and no MED text layers, so that a new
    backbone fails loudly here instead of being measured or pruned on an empty set.
    """
    from models.clip import ClipTextTower

    owners: dict[int, tuple[str, object]] = {}
    for name, module in model.named_modules():
        if _is_momentum(name):
            continue
        if isinstance(module, (VisionTransformer, ClipTextTower)):
            modality = TEXT if isinstance(module, ClipTextTower) else VISION
            chosen = getattr(module, "masked_linears", None)  # CLIP: a subset of each block's Linears
            for block in module.blocks:
                if chosen is None:
                    subs = list(block.modules())
                else:
                    subs = [block.get_submodule(path) for path in chosen] if hasattr(block, "attn") else []
                for sub in subs:
                    owners.setdefault(id(sub), (modality, None))
        elif isinstance(module, BertModel):
            for layer in module.encoder.layer:
                for sub in layer.modules():
                    owners.setdefault(id(sub), (TEXT, layer))
    found: list[Target] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) not in owners or _is_momentum(name):
            continue
        modality, layer = owners[id(module)]
        tokens = "image" if modality == VISION or (layer is not None and _cross_kv(layer, module)) else "text"
        found.append(Target(name, modality, tokens))
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no VisionTransformer blocks and no MED BertModel layers, so there "
            "is no known set of Linear modules to measure or mask"
        )
    return found


def target_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, modality)`` of every target, in registration order."""
    return [(t.name, t.modality) for t in targets(model)]
