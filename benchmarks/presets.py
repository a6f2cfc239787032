"""Real-size models with random weights (for counting and timing without checkpoints), and a uniform
width cut that stands in for a compressed model.

A preset names a task and the config keys that make its published backbone; the model is built by the
task module's own ``build_model``, so a preset is exactly what that task trains. Costs do not depend on
weights, so counting can build on the ``meta`` device (no memory, no time); timing needs real tensors.

ViLT-B/32 (``vilt-vqa``) is timed with its VQA head, where PuMer's benchmark uses the retrieval class (a 1-unit
head): the heads differ by 6 M of 15.95 G multiply-adds.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.blip_probes import DUMMY_TEXTS
from tasks import registry

__all__ = ["PRESETS", "Preset", "bert_layout_vocab", "build_preset", "preset_config", "uniform_slice"]

REPO = Path(__file__).resolve().parents[1]
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; BLIP adds [DEC] and [ENC] for 30524
# Dummy-text words that bert-base-uncased does not hold whole and splits into two word pieces. With
# these splits the NLVR2 sentence has 36 tokens and the longest VQA question 14, which is what the
# published dense totals imply (each count off by one token would move those totals by 0.1-3.7 G).
_WORDPIECES = {"params": ("para", "##ms"), "flops": ("flop", "##s"), "scoreboard": ("score", "##board")}


@dataclass(frozen=True)
class Preset:
    task: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    backbone: str = ""  # "": the task's default

    @property
    def blip(self) -> bool:
        return self.task != "classification" and self.backbone in ("", "blip")


PRESETS: dict[str, Preset] = {
    "blip-nlvr": Preset("nlvr", {"vit": "base", "image_size": 384}, "BLIP ViT-B/16 + MED, 384 px"),
    "blip-caption": Preset("caption", {"vit": "base", "image_size": 384}, "BLIP ViT-B/16 + MED decoder, 384 px"),
    "blip-vqa": Preset("vqa", {"vit": "base", "image_size": 480}, "BLIP ViT-B/16 + MED encoder/decoder, 480 px"),
    "blip-retrieval": Preset(
        "retrieval",
        {"vit": "base", "image_size": 384, "queue_size": 57600},
        "BLIP ViT-B/16 + MED with momentum towers, 384 px, queue 57600",
    ),
    "clip-retrieval": Preset(
        "retrieval",
        {"clip_model": "ViT-L/14@336px", "image_size": 336, "queue_size": 57600},
        "OpenAI CLIP ViT-L/14 at 336 px with momentum towers, queue 57600 (UPop's CLIP retrieval)",
        backbone="clip",
    ),
    "vilt-vqa": Preset(
        "vqa",
        {"image_size": 384, "max_text_len": 40, "vqa_labels": 3129},
        "ViLT-B/32, 384 x 384 px (145 image tokens), VQA head (3129 answers); timed with 32 text tokens",
        backbone="vilt",
    ),
    "deit-tiny": Preset("classification", {"vit": "deit_tiny", "image_size": 224, "num_classes": 1000}, "224 px"),
    "deit-small": Preset("classification", {"vit": "deit_small", "image_size": 224, "num_classes": 1000}, "224 px"),
    "deit-base": Preset("classification", {"vit": "deit_base", "image_size": 224, "num_classes": 1000}, "224 px"),
}


def _basic_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, as BERT's basic tokenizer splits them."""
    out, word = [], []
    for ch in text.lower():
        if ch.isalnum():
            word.append(ch)
            continue
        if word:
            out.append("".join(word))
            word = []
        if not ch.isspace():
            out.append(ch)
    if word:
        out.append("".join(word))
    return out


def bert_layout_vocab(directory: str | Path | None = None) -> Path:
    """A ``vocab.txt`` with bert-base-uncased's size and special-token ids ([PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103), holding every word of the seeds' dummy texts as one token.

    It stands in for the real vocabulary, which cannot be downloaded here: sizes (and so the
    embedding and LM-head costs) are exact, and the dummy texts tokenise to bert-base-uncased's
    lengths (each word one token, except the few in ``_WORDPIECES``). Written once into
    ``directory`` (default: a folder under the system temp dir) and reused.
    """
    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / "vlcompress-bert-vocab"
    path = directory / "vocab.txt"
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(tokens)
    words = {w for text in DUMMY_TEXTS for w in _basic_tokens(text)} | set("abcdefghijklmnopqrstuvwxyz")
    for word in sorted(words - _WORDPIECES.keys() | {p for pieces in _WORDPIECES.values() for p in pieces}):
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    tokens += [f"[filler{i}]" for i in range(BERT_VOCAB_SIZE - len(tokens))]
    text = "\n".join(tokens) + "\n"
    if not path.is_file() or path.read_text() != text:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return directory


def preset_config(name: str, tokenizer: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """(task, config) of preset ``name``: the task's schema defaults plus the preset's keys."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    config = copy.deepcopy(dict(registry.lookup(preset.task, preset.backbone).load().SCHEMA))
    config.update(preset.overrides)
    if preset.blip:
        config["med_config"] = str(REPO / "configs" / "med_config.json")
        config["tokenizer"] = str(tokenizer) if tokenizer is not None else str(bert_layout_vocab())
    return preset.task, config


def build_preset(
    name: str, device: str | torch.device = "meta", tokenizer: str | Path | None = None
) -> tuple[str, dict[str, Any], nn.Module]:
    """(task, config, model) of preset ``name`` with random weights on ``device`` (``meta``: shapes only)."""
    task, config = preset_config(name, tokenizer)
    with torch.device(device):
        model = registry.lookup(task, PRESETS[name].backbone).load().build_model(config)
    return task, config, model.eval()


def _encoders(model: nn.Module) -> list[nn.Module]:
    from models.clip import ClipTextTower
    from models.med import BertModel
    from models.vit import VisionTransformer

    return [m for m in model.modules() if isinstance(m, (VisionTransformer, BertModel, ClipTextTower))]


def uniform_slice(model: nn.Module, keep: float) -> nn.Module:
    """Cut every attention's head width and every MLP's hidden width to ``ceil(keep * width)``, in place.

    The kept entries are the first ones (weights do not change costs). Every ViT and MED encoder in
    the model is cut alike, momentum towers included, so they keep matching their online towers. This
    is a stand-in for a compressed model when none exists; a real one has different widths per block.
    Returns ``model``.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    from models.med import BertModel
    from models.med import prunable_units as med_units
    from models.vit import prunable_units as vit_units

    done: set[tuple[int, str]] = set()  # modules shared between encoders are cut once
    for encoder in _encoders(model):
        units = med_units(encoder) if isinstance(encoder, BertModel) else vit_units(encoder)
        for unit in units:
            key = (id(unit.module), unit.kind)
            if unit.kind == "head" or key in done:
                continue
            done.add(key)
            unit.keep(list(range(max(1, math.ceil(keep * unit.size)))))
    return model
