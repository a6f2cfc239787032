"""ViLT pre-training (image-text matching + masked-token prediction) on image-caption pairs.

Real ViLT pre-training (GCC, SBU, COCO, VG) is out of scope; this makes the tiny ViLT that the demos start from, on
a shapes world of its own (scripts/demo/make_tiny_vilt.sh), as ViLT was made: the transformer starts from an image
classifier (``vit_init``, ViLT from an ImageNet ViT), then trains image-text matching on captions of which half are
swapped for another image's (a 2-way head on the pooled [CLS]) and masked-token prediction with 15 % of the text
tokens masked (BERT's 80 / 10 / 10 rule), scored on the matching pairs only. ViLT runs the two in separate passes
(MLM on unmasked-for-ITM pairs); here one pass serves both, at half the cost, the ITM text carrying the masks.
Evaluation: ITM accuracy on the val images (each with its own first caption or the next image's) and MLM accuracy on
the masked tokens of the matching pairs (a fixed draw).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data import create_dataset
from data.vilt import tokenize, vilt_transform
from models.checkpoints import load_vit_weights
from models.vilt import ViLT, build_vilt
from tasks.common import build_loaders, model_device
from tasks.metrics import wilson_interval
from tasks.vilt import VILT_SCHEMA, load_pretrained, vilt_tokenizer

__all__ = ["SCHEMA", "build_data", "build_model", "build_task", "load_pretrained", "mask_tokens"]

SCHEMA: dict[str, Any] = {
    **VILT_SCHEMA,
    "dataset": "coco",
    "vit_init": "",  # an image classifier (our ViT layout) to start the transformer from
    "mlm_prob": 0.15,
}


def mask_tokens(
    ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of ``ids`` (B, T): each token that is not ``special`` is chosen with ``prob``; of the chosen,
    80 % become ``mask_id``, 10 % a random token, 10 % stay. Returns (masked ids, labels: the original id where
    chosen, -100 elsewhere)."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (draw < 0.8)] = mask_id
    random_tokens = torch.randint(vocab, ids.shape, generator=generator)
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels


class PretrainCollate:
    """Train items (image, caption, image id) -> (images, masked ids, mask, ITM labels, MLM labels); eval items
    (image, index) over a :class:`~data.captions.RetrievalEvalDataset` -> the same, with the fixed negatives and
    masks of the module docstring. MLM labels are -100 on the non-matching pairs."""

    def __init__(self, tokenizer, max_len: int, prob: float, dataset: Any = None) -> None:
        self.tokenizer, self.max_len, self.prob, self.dataset = tokenizer, max_len, prob, dataset
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, items: Sequence[tuple]) -> tuple[torch.Tensor, ...]:
        if self.dataset is None:
            images, captions, image_ids = zip(*items)
            g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
            itm_texts, labels = [], []
            for i, caption in enumerate(captions):
                others = [j for j in range(len(captions)) if image_ids[j] != image_ids[i]]
                if others and torch.rand(1, generator=g).item() < 0.5:
                    itm_texts.append(captions[others[int(torch.randint(len(others), (1,), generator=g))]])
                    labels.append(0)
                else:
                    itm_texts.append(caption)
                    labels.append(1)
        else:
            images, index = zip(*items)
            g = torch.Generator().manual_seed(int(index[0]))
            texts, img2txt, n = self.dataset.text, self.dataset.img2txt, len(self.dataset)
            captions = [texts[img2txt[i][0]] for i in index]
            itm_texts = [texts[img2txt[(i + 1) % n][0]] if k % 2 else captions[k] for k, i in enumerate(index)]
            labels = [0 if k % 2 else 1 for k in range(len(index))]
        ids, mask = tokenize(self.tokenizer, itm_texts, self.max_len)
        special = torch.isin(ids, torch.tensor(sorted(self.special)))
        masked, mlm_labels = mask_tokens(ids, special, self.tokenizer.mask_token_id, len(self.tokenizer), self.prob, g)
        itm_labels = torch.tensor(labels)
        mlm_labels[itm_labels == 0] = -100
        return torch.stack(images), masked, mask, itm_labels, mlm_labels


def build_data(config: dict, dist: utils.DistInfo):
    tokenizer = vilt_tokenizer(config)
    train, val, _ = create_dataset("retrieval", config)
    size = int(config["image_size"])
    train.transform, val.transform = vilt_transform("train", size, config["randaug"]), vilt_transform("test", size)
    return build_loaders(
        config,
        dist,
        train,
        {"val": val},
        collate_fn=PretrainCollate(tokenizer, config["max_text_len"], config["mlm_prob"]),
        eval_collate_fn=PretrainCollate(tokenizer, config["max_text_len"], config["mlm_prob"], val),
    )


def build_model(config: Mapping) -> ViLT:
    model = build_vilt(config, "pretrain")
    if config["vit_init"]:
        load_vit_weights(model.transformer, config["vit_init"])
    return model


def _losses(model: ViLT, batch) -> dict[str, torch.Tensor]:
    device = model_device(model)
    images, ids, mask, itm_labels, mlm_labels = (t.to(device) for t in batch)
    itm, mlm = model.pretrain_logits(ids, mask, images)
    return {"itm": itm, "itm_labels": itm_labels, "mlm": mlm, "mlm_labels": mlm_labels}


class PretrainTask:
    name = "pretrain"
    main_metric = "itm_acc"

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        out = _losses(model, batch)
        itm = F.cross_entropy(out["itm"].float(), out["itm_labels"])
        mlm = F.cross_entropy(out["mlm"].flatten(0, 1).float(), out["mlm_labels"].flatten(), ignore_index=-100)
        return {"loss": itm + mlm, "loss_itm": itm, "loss_mlm": mlm}

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, Any]:
        itm_hits = itm_n = mlm_hits = mlm_n = 0.0
        for batch in utils.progress(loader, desc=f"pretrain {split}"):
            out = _losses(model, batch)
            itm_hits += (out["itm"].argmax(1) == out["itm_labels"]).sum().item()
            itm_n += len(out["itm_labels"])
            chosen = out["mlm_labels"] != -100
            mlm_hits += (out["mlm"].argmax(-1)[chosen] == out["mlm_labels"][chosen]).sum().item()
            mlm_n += chosen.sum().item()
        a, n, b, m = utils.all_reduce_sum([itm_hits, itm_n, mlm_hits, mlm_n])
        return {
            "itm_acc": 100.0 * a / max(n, 1),
            "itm_acc_ci95": wilson_interval(a, n),
            "mlm_acc": 100.0 * b / max(m, 1),
            "n": int(n),
        }


def build_task(config: Mapping, train_loader) -> PretrainTask:
    return PretrainTask()
