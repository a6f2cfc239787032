"""Image-text retrieval with ViLT (COCO / Flickr30k, Karpathy splits): a rank score per (image, caption) pair.

Training (spec pumer_vilt.md 4; ViLT's ``irtr`` task, PuMer's retrieval): every image is paired with its caption and
``negatives`` captions of other images (15), the rank head's scores of the ``1 + negatives`` pairs go through a
cross-entropy with the true caption first, and ``itm_weight`` (0.5) x the ITM head's cross-entropy over the same pairs
(match for the first, no match for the rest) is added. Evaluation scores every (image, caption) pair of the split, as
ViLT does (N_img x N_txt passes: the demo split is kept small), and reports recall@1/5/10 both ways with 95 %
intervals. PuMer distils nothing here: its logit KD on a one-unit score is identically 0, so this task has no logits
for a teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data import create_dataset
from data.samplers import ShardSampler
from data.utils import pre_caption
from data.vilt import tokenize, vilt_transform
from models.vilt import ViLT, build_vilt
from tasks.common import build_loaders, model_device
from tasks.metrics import retrieval_metrics
from tasks.vilt import VILT_SCHEMA, load_pretrained, vilt_tokenizer

__all__ = ["SCHEMA", "build_data", "build_model", "build_task", "load_pretrained"]

SCHEMA: dict[str, Any] = {
    **VILT_SCHEMA,
    "dataset": "coco",  # coco | flickr (Karpathy-format files under ann_root)
    "negatives": 15,  # false captions per image in training
    "itm_weight": 0.5,  # the ITM term beside the rank loss
    "text_batch": 256,  # captions scored per pass in evaluation
}


class RetrievalCollate:
    """Train items (image, caption, image id) -> (images (B, 3, H, W), ids (B, 1 + K, T), mask (B, 1 + K, T)): each
    image's own caption first, then ``K`` captions of other images drawn from ``captions`` (the split's)."""

    def __init__(self, tokenizer, max_len: int, captions: Sequence[tuple[str, Any]], negatives: int) -> None:
        self.tokenizer, self.max_len, self.captions, self.negatives = tokenizer, max_len, captions, negatives

    def __call__(self, items: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, texts, image_ids = zip(*items)
        rows = []
        for caption, image_id in zip(texts, image_ids):
            drawn: list[str] = []
            while len(drawn) < self.negatives:
                text, owner = self.captions[int(torch.randint(len(self.captions), (1,)))]
                if owner != image_id:
                    drawn.append(text)
            rows += [caption, *drawn]
        ids, mask = tokenize(self.tokenizer, rows, self.max_len)
        shape = (len(items), 1 + self.negatives, -1)
        return torch.stack(images), ids.view(shape), mask.view(shape)


def build_data(config: dict, dist: utils.DistInfo):
    tokenizer = vilt_tokenizer(config)
    train, val, test = create_dataset("retrieval", config)
    size = int(config["image_size"])
    train.transform = vilt_transform("train", size, config["randaug"])
    val.transform = test.transform = vilt_transform("test", size)
    ids = train.img_ids
    captions = [(pre_caption(a["caption"], 30), ids[a["image_id"]]) for a in train.annotation]
    if len(set(owner for _, owner in captions)) < 2:
        raise ValueError("retrieval training needs captions of at least two images to draw negatives from")
    collate = RetrievalCollate(tokenizer, config["max_text_len"], captions, config["negatives"])
    loaders = build_loaders(config, dist, train, {"val": val, "test": test}, collate_fn=collate, shard_eval=False)
    for loader in loaders[1].values():
        loader.tokenizer = tokenizer  # the evaluation tokenizes the split's captions itself
    return loaders


def build_model(config: Mapping) -> ViLT:
    return build_vilt(config, "retrieval")


class ViltRetrievalTask:
    name = "retrieval"
    main_metric = "r_mean"

    def __init__(self, config: Mapping):
        self.config = config

    def train_step(self, model: ViLT, batch, info) -> dict[str, torch.Tensor]:
        device = model_device(model)
        images, ids, mask = (t.to(device) for t in batch)
        b, pairs, t = ids.shape
        images = images[:, None].expand(-1, pairs, -1, -1, -1).reshape(b * pairs, *images.shape[1:])
        pooled = model.pooled(ids.view(b * pairs, t), mask.view(b * pairs, t), images)
        rank = F.cross_entropy(model.rank_output(pooled).view(b, pairs).float(), ids.new_zeros(b))
        itm_labels = torch.zeros(b, pairs, dtype=torch.long, device=device)
        itm_labels[:, 0] = 1
        itm = F.cross_entropy(model.itm_score(pooled).float(), itm_labels.view(-1))
        return {"loss": rank + self.config["itm_weight"] * itm, "loss_rank": rank, "loss_itm": itm}

    @torch.no_grad()
    def evaluate(self, model: ViLT, loader, split: str) -> dict[str, Any]:
        """The rank score of every (image, caption) pair; each rank scores a share of the images and the rows are
        gathered, so every rank reports the same recall."""
        device = model_device(model)
        ds = loader.dataset
        all_ids, all_mask = (t.to(device) for t in tokenize(loader.tokenizer, ds.text, self.config["max_text_len"]))
        rank, world = utils.get_rank(), utils.get_world_size()
        mine = list(ShardSampler(ds, world, rank))
        rows: dict[int, torch.Tensor] = {}
        step = self.config["text_batch"]
        for index in utils.progress(mine, desc=f"retrieval {split} images"):
            image = ds[index][0].to(device)[None]
            scores = []
            for start in range(0, len(ds.text), step):
                ids, mask = all_ids[start : start + step], all_mask[start : start + step]
                scores.append(model(ids, mask, image.expand(len(ids), -1, -1, -1))[:, 0].float().cpu())
            rows[index] = torch.cat(scores)
        gathered: dict[int, torch.Tensor] = {}
        for part in utils.all_gather_object(rows):
            gathered.update(part)
        i2t = torch.stack([gathered[i] for i in range(len(ds))])
        return retrieval_metrics(i2t, i2t.t(), ds.txt2img, ds.img2txt)


def build_task(config: Mapping, train_loader) -> ViltRetrievalTask:
    return ViltRetrievalTask(config)
