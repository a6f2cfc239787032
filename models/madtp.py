"""Where MADTP's reducers sit in a model, and the seed's released files (spec madtp.md 1, 8).

Every block of every image encoder (momentum towers included) reduces after its attention residual; every layer
of every bidirectional MED text encoder reduces after its self-attention, before its cross-attention; CLIP's text
blocks reduce after attention with the end-of-text token kept. All read one :class:`~models.token_ops.
AlignmentTokens` (``model.madtp``); CLIP's blocks map their tokens to the alignment width with one Linear per
block and tower (``q_map``), shared by the momentum twin. The placement is model code: a MADTP checkpoint carries
it in its architecture description, and the seed's ``{'model', 'epoch', 'temperature'}`` files are converted to it
here (:func:`from_release`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from utils import CheckpointError

__all__ = ["encoders", "from_release", "reducer_plan", "reducers"]


def encoders(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """``{"vision": [(path, encoder)], "text": [...]}``: every ViT (CLIP's vision tower included), every MED text
    encoder that is not a decoder (decoders run with a key/value cache, which cannot lose tokens) and every CLIP text
    tower of ``model``."""
    from models.clip import ClipTextTower
    from models.med import BertModel
    from models.vit import VisionTransformer

    found: dict[str, list[tuple[str, nn.Module]]] = {"vision": [], "text": []}
    for name, m in model.named_modules():
        if isinstance(m, VisionTransformer):
            found["vision"].append((name, m))
        elif isinstance(m, ClipTextTower) or (
            isinstance(m, BertModel) and not name.split(".")[0].startswith("text_decoder")
        ):
            found["text"].append((name, m))
    return found


def reducers(model: nn.Module) -> list[Any]:
    """Every :class:`~models.token_ops.MADTPReducer` in the token hooks of ``model``'s blocks."""
    from models.token_ops import MADTPReducer

    return [h for m in model.modules() for h in getattr(m, "token_hooks", None) or [] if isinstance(h, MADTPReducer)]


def _blocks(encoder: nn.Module) -> nn.ModuleList:
    return encoder.layers if hasattr(encoder, "layers") else encoder.blocks


def reducer_plan(
    model: nn.Module,
    temperature: float,
    sd_num: int = 100,
    sd_dim: int = 768,
    q_map: bool = False,
    towers: tuple[str, ...] = ("vision", "text"),
) -> dict[str, list[dict[str, Any]]]:
    """``{block path: [madtp reducer spec]}`` for every reducing block of ``model`` (see the module docstring);
    ``q_map``: project tokens to ``sd_dim`` in each block (CLIP), else their width must be ``sd_dim`` (BLIP)."""
    from models.clip import ClipTextTower, ClipVisionTower
    from models.token_ops import MADTPReducer

    plan: dict[str, list[dict[str, Any]]] = {}
    for modality in towers:
        for path, encoder in encoders(model)[modality]:
            clip_text = isinstance(encoder, ClipTextTower)
            bert = not clip_text and modality == "text"
            for i, block in enumerate(_blocks(encoder)):
                if not isinstance(getattr(block, "token_hooks", None), list):  # a skipped block
                    continue
                width = block.attention.self.dim if bert else block.attn.dim
                if not q_map and width != sd_dim:
                    raise ValueError(
                        f"madtp: {path} has width {width} but the alignment tokens have {sd_dim} (madtp.sd_dim); "
                        "match them, or map tokens with madtp.q_map: true (CLIP)"
                    )
                reducer = MADTPReducer(
                    temperature,
                    point="post_self_attn" if bert else "post_attn",
                    max_keep=1 if isinstance(encoder, ClipVisionTower) else 0,  # the seed's CLIP vision rule
                    keep_marked=clip_text,
                    q_map=f"{modality}_{i}" if q_map else None,
                    in_dim=width if q_map else None,
                    sd_num=sd_num,
                    sd_dim=sd_dim,
                )
                plan[f"{path}.{_block_path(encoder)}.{i}" if path else f"{_block_path(encoder)}.{i}"] = [reducer.spec()]
    if not plan:
        raise ValueError(f"madtp: {type(model).__name__} has no encoder to reduce tokens in")
    return plan


def _block_path(encoder: nn.Module) -> str:
    return "encoder.layer" if hasattr(encoder, "layers") and hasattr(encoder, "encoder") else "blocks"


def from_release(
    model: nn.Module, sd: Mapping[str, Tensor], ckpt: Mapping[str, Any], source: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A seed MADTP BLIP file (``{'model': ... 'space_dict' ..., 'epoch', 'temperature'}``) as (state dict with
    ``madtp.space_dict``, architecture description with the reducers at the file's temperature). A file without
    its temperature or its alignment tokens is an error: either would silently evaluate another model."""
    from models.arch import architecture

    if "space_dict" not in sd:
        raise CheckpointError(f"{source}: a MADTP file needs 'space_dict' (the alignment tokens); it has none")
    if "temperature" not in ckpt:
        raise CheckpointError(
            f"{source} holds MADTP alignment tokens but no 'temperature': without it the model would run unpruned"
        )
    sd = dict(sd)
    space = sd.pop("space_dict")
    sd["madtp.space_dict"] = space
    arch = architecture(model)
    arch["reducers"] = reducer_plan(model, float(ckpt["temperature"]), space.shape[0], space.shape[1])
    return sd, arch
