"""ViLT weights in every released layout, and export to Hugging Face's.

* **original** (dandelin/ViLT Lightning ``.ckpt``: ``{'state_dict': ...}``; spec pumer_vilt.md 5.2): our own key
  names, so nothing is renamed; read with ``weights_only=True``.
* **pumer** (csarron/PuMer folders: ``config.json`` + ``pytorch_model.bin``; 5.3): backbone keys under ``vilt.``, heads
  under their original names; ``config.json`` carries the reduction settings (``prune_r``, ``merge_r``,
  ``merge_text``, ``reduce_layers``, ``sim_method``, ``merge_style``) that the released model was trained and is
  evaluated with, which become PuMer reducers on the blocks (trap T8: evaluation follows the file's config).
* **hf** (transformers ``Vilt*``: ``vilt.embeddings.*``, ``vilt.encoder.layer.{i}.*``, split q/k/v, ``classifier.*``;
  5.4), as a folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or a single file.

Loading policy (:func:`load_vilt_checkpoint`): a head the file lacks is freshly initialised when training starts
from it (a pre-trained backbone) and an error when evaluating; NLVR2's third modality row is copied from the image
row and the retrieval ranker starts from the ITM "match" row, as the released conversions do; any other missing or
unexpected key is an error naming the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from utils import CheckpointError, load_checkpoint_file, load_model_folder, log

__all__ = [
    "HEAD_PREFIXES",
    "detect_layout",
    "from_hf",
    "load_vilt_checkpoint",
    "pumer_reducers",
    "read_vilt_weights",
    "save_hf",
    "to_hf",
]

HEAD_PREFIXES = ("vqa_classifier.", "nlvr2_classifier.", "ve_classifier.", "rank_output.", "itm_score.", "mlm_score.")
# Hugging Face class and head prefix per ViLT head; retrieval keeps rank_output (HF drops itm_score).
HF_CLASSES = {
    "vqa": ("ViltForQuestionAnswering", "vqa_classifier."),
    "nlvr2": ("ViltForImagesAndTextClassification", "nlvr2_classifier."),
    "retrieval": ("ViltForImageAndTextRetrieval", None),
    "none": ("ViltModel", None),
}
_DROPPED = ("text_embeddings.position_ids",)  # a persistent buffer of older transformers' BERT embeddings

_HF_FIXED = {
    "text_embeddings.": "vilt.embeddings.text_embeddings.",
    "token_type_embeddings.weight": "vilt.embeddings.token_type_embeddings.weight",
    "transformer.cls_token": "vilt.embeddings.cls_token",
    "transformer.pos_embed": "vilt.embeddings.position_embeddings",
    "transformer.patch_embed.proj.": "vilt.embeddings.patch_embeddings.projection.",
    "transformer.norm.": "vilt.layernorm.",
    "pooler.dense.": "vilt.pooler.dense.",
}
_HF_BLOCK = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attn.proj.": "attention.output.dense.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}


def detect_layout(sd: Mapping[str, Any], source: str = "the state dict") -> str:
    keys = list(sd)
    if any(k.startswith(("vilt.embeddings.", "vilt.encoder.", "embeddings.text_embeddings.")) for k in keys):
        return "hf"
    if any(k.startswith("vilt.transformer.") for k in keys):
        return "pumer"
    if any(k.startswith("transformer.blocks.") for k in keys):
        return "original"
    raise CheckpointError(
        f"{source} is not a ViLT state dict (no transformer.blocks.*, vilt.* keys); first keys: {keys[:5]}"
    )


def to_hf(sd: Mapping[str, Tensor], head: str = "vqa") -> dict[str, Tensor]:
    """Our (original-layout) state dict in Hugging Face's layout for ``head`` (``ViltForQuestionAnswering`` etc.)."""
    if head not in HF_CLASSES:
        raise ValueError(f"Hugging Face has no ViLT class for the {head!r} head; it has {sorted(HF_CLASSES)}")
    head_prefix = HF_CLASSES[head][1]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        m = re.match(r"transformer\.blocks\.(\d+)\.(.*)", key)
        if m:
            layer, rest = f"vilt.encoder.layer.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.qkv."):
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{layer}attention.attention.{name}.{rest.rsplit('.', 1)[1]}"] = part.clone()
                continue
            for ours, theirs in _HF_BLOCK.items():
                if rest.startswith(ours):
                    out[layer + theirs + rest[len(ours) :]] = value
                    break
            else:
                raise ValueError(f"no Hugging Face name for {key}")
            continue
        for ours, theirs in _HF_FIXED.items():
            if key == ours or (ours.endswith(".") and key.startswith(ours)):
                out[theirs + key[len(ours) :]] = value
                break
        else:
            if head_prefix and key.startswith(head_prefix):
                out["classifier." + key[len(head_prefix) :]] = value
            elif head == "retrieval" and key.startswith("rank_output."):
                out[key] = value
            elif key.startswith(HEAD_PREFIXES):
                continue  # heads Hugging Face's class does not have (itm_score, mlm_score)
            else:
                raise ValueError(f"no Hugging Face name for {key}")
    return out


def from_hf(sd: Mapping[str, Tensor], head: str, source: str = "the state dict") -> dict[str, Tensor]:
    """A Hugging Face ``Vilt*`` state dict in our layout; ``classifier.*`` becomes ``head``'s classifier."""
    if not any(k.startswith("vilt.") for k in sd):  # a bare ViltModel
        sd = {f"vilt.{k}": v for k, v in sd.items()}
    fixed = {theirs: ours for ours, theirs in _HF_FIXED.items()}
    block = {theirs: ours for ours, theirs in _HF_BLOCK.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        m = re.match(r"vilt\.encoder\.layer\.(\d+)\.(.*)", key)
        if m:
            prefix, rest = f"transformer.blocks.{m.group(1)}.", m.group(2)
            q = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if q:
                qkv.setdefault(f"{prefix}attn.qkv.{q.group(2)}", {})[q.group(1)] = value
                continue
            for theirs, ours in block.items():
                if rest.startswith(theirs):
                    out[prefix + ours + rest[len(theirs) :]] = value
                    break
            else:
                raise CheckpointError(f"{source}: unknown Hugging Face ViLT key {key}")
            continue
        for theirs, ours in fixed.items():
            if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
                out[ours + key[len(theirs) :]] = value
                break
        else:
            if key.startswith("classifier."):
                head_prefix = HF_CLASSES.get(head, (None, None))[1] or {"ve": "ve_classifier."}.get(head)
                if head_prefix is None:
                    raise CheckpointError(f"{source}: a classifier, but the model's head is {head!r}")
                out[head_prefix + key[len("classifier.") :]] = value
            elif key.startswith("rank_output."):
                out[key] = value
            else:
                raise CheckpointError(f"{source}: unknown Hugging Face ViLT key {key}")
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{source}: {key} lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def pumer_reducers(config: Mapping[str, Any], depth: int, source: str = "config.json") -> dict[str, list[dict]]:
    """The reducer specs a PuMer ``config.json`` describes (``{}`` when it reduces nothing)."""
    layers = config.get("reduce_layers") or []
    if isinstance(layers, str | int):  # "258" or 258
        layers = [int(c) for c in str(layers)]
    prune, merge, text = (float(config.get(k, 0) or 0) for k in ("prune_r", "merge_r", "merge_text"))
    if config.get("prune_layers"):
        raise CheckpointError(f"{source}: prune_layers (PuMer's DynamicViT baseline) is not supported")
    if not layers or (prune <= 0 and int(merge) <= 0):
        return {}
    bad = [i for i in layers if not 0 <= int(i) < depth]
    if bad:
        raise CheckpointError(f"{source}: reduce_layers {bad} outside the model's {depth} blocks")
    spec = {
        "kind": "pumer",
        "prune_r": prune,
        "merge_r": merge,
        "merge_text": text,
        "sim_method": config.get("sim_method", "mean_head"),
        "merge_style": config.get("merge_style", "tome"),
    }
    return {f"transformer.blocks.{int(i)}": [dict(spec)] for i in layers}


def read_vilt_weights(path: str | Path, head: str) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(state dict in our layout, architecture description or None, facts) from any ViLT file or folder: the
    original ``.ckpt``, a PuMer or Hugging Face folder, our ``.safetensors`` (+ description) / ``.pth``. ``facts``:
    ``layout``, and the folder's ``config`` where there is one."""
    from models.arch import read_weights

    path = Path(path)
    facts: dict[str, Any] = {}
    arch = None
    if path.is_dir():
        sd, facts["config"] = load_model_folder(path, "a PuMer or Hugging Face ViLT folder")
    elif path.suffix == ".ckpt":
        obj = load_checkpoint_file(path)
        if "state_dict" not in obj:
            raise CheckpointError(f"{path}: a Lightning .ckpt without 'state_dict' (keys {sorted(obj)[:6]})")
        sd = dict(obj["state_dict"])
    else:
        sd, arch = read_weights(path)
    layout = facts["layout"] = detect_layout(sd, str(path))
    if layout == "hf":
        sd = from_hf(sd, head, str(path))
    elif layout == "pumer":
        sd = {(k[len("vilt.") :] if k.startswith("vilt.") else k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _DROPPED}
    if layout == "pumer" and arch is None:
        reducers = pumer_reducers(facts["config"], _depth(sd), str(path / "config.json"))
        if reducers:
            arch = {"version": 2, "units": {}, "reducers": reducers}
    return sd, arch, facts


def _depth(sd: Mapping[str, Tensor]) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def load_vilt_checkpoint(model, sd: dict[str, Tensor], source: str, evaluate: bool = False) -> list[str]:
    """Load ``sd`` (our layout) into ``model`` under the policy of the module docstring; returns what was adapted."""
    target = model.state_dict()
    sd = dict(sd)
    notes: list[str] = []
    types = "token_type_embeddings.weight"
    if types in sd and sd[types].shape[0] < target[types].shape[0]:
        if evaluate:
            raise CheckpointError(
                f"{source}: {sd[types].shape[0]} modality-type rows, the {model.head} model needs "
                f"{target[types].shape[0]} (an NLVR2 model); evaluate a file fine-tuned for this task"
            )
        extra = target[types].shape[0] - sd[types].shape[0]
        sd[types] = torch.cat([sd[types], sd[types][1:2].expand(extra, -1)], dim=0)
        notes.append("the NLVR2 modality row copied from the image row")
    positions = "text_embeddings.position_embeddings.weight"
    if positions in sd and sd[positions].shape[0] > target[positions].shape[0]:
        # A model built for shorter texts (PuMer's VQA: 32 of the pre-trained 40) keeps the first positions.
        sd[positions] = sd[positions][: target[positions].shape[0]]
        notes.append(f"text positions cut to the model's {target[positions].shape[0]}")
    if model.head == "retrieval" and "rank_output.weight" not in sd and "itm_score.fc.weight" in sd and not evaluate:
        sd["rank_output.weight"] = sd["itm_score.fc.weight"][1:2].clone()
        sd["rank_output.bias"] = sd["itm_score.fc.bias"][1:2].clone()
        notes.append("rank_output from the ITM match row")
    head_keys = [k for k in target if k.startswith(HEAD_PREFIXES)]
    missing = [k for k in target if k not in sd]
    missing_heads = [k for k in missing if k in head_keys]
    if evaluate and missing_heads:
        raise CheckpointError(
            f"{source} has no {model.head} head ({missing_heads[:3]}); evaluating needs weights fine-tuned for it"
        )
    other_missing = [k for k in missing if k not in head_keys]
    unexpected = [k for k in sd if k not in target]
    # Heads of other tasks in a pre-trained file (mlm_score, itm_score) are dropped when fine-tuning starts.
    dropped = [k for k in unexpected if k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in unexpected if k not in dropped]
    if other_missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the ViLT {model.head} model: missing {other_missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if shapes:
        raise CheckpointError(f"{source}: shapes differ from the model's: {shapes[:4]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    if missing_heads:
        notes.append(f"the {model.head} head initialised fresh ({len(missing_heads)} tensors)")
    if dropped:
        notes.append(f"dropped {len(dropped)} tensors of other heads ({sorted({k.split('.')[0] for k in dropped})})")
    for note in notes:
        log.info("%s: %s", source, note)
    return notes


def hf_config(model, num_labels: int | None = None) -> dict[str, Any]:
    """A transformers ``ViltConfig`` dict describing ``model`` (dense widths; eps as the model's)."""
    vit = model.transformer
    block = vit.blocks[0]
    text = model.text_embeddings
    config = {
        "model_type": "vilt",
        "architectures": [HF_CLASSES[model.head][0]],
        "vocab_size": text.word_embeddings.num_embeddings,
        "type_vocab_size": text.token_type_embeddings.num_embeddings,
        "modality_type_vocab_size": model.token_type_embeddings.num_embeddings,
        "max_position_embeddings": text.position_embeddings.num_embeddings,
        "hidden_size": model.hidden,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": block.norm1.eps,
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": vit.patch_embed.patch_size[0],
        "num_channels": 3,
        "qkv_bias": True,
        "max_image_length": -1,
        "num_images": 2 if model.head == "nlvr2" else -1,
    }
    if num_labels is not None:
        config["num_labels"] = num_labels
    return config


def save_hf(model, folder: str | Path, id2label: Mapping[int, str] | None = None) -> Path:
    """Write ``model`` (dense, no reducers) as a Hugging Face ``Vilt*`` folder: ``config.json`` and
    ``model.safetensors``."""
    from safetensors.torch import save_file

    from utils import atomic_write_bytes

    if any(getattr(b, "token_hooks", None) for b in model.transformer.blocks):
        raise ValueError("Hugging Face's ViLT has no token reducers; export the dense model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_hf({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, model.head)
    n = None
    if model.head == "vqa":
        n = model.vqa_classifier[3].out_features
    elif model.head == "nlvr2":
        n = 2
    config = hf_config(model, n)
    if id2label is not None:
        config["id2label"] = {str(k): v for k, v in id2label.items()}
        config["label2id"] = {v: int(k) for k, v in id2label.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder
