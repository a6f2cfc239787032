"""NLVR2: is the sentence true of the pair of images? Accuracy on dev (val) and test-P (test)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data import create_dataset
from data.nlvr import NLVRPairBatch, NLVRPairDataset, collate_pairs
from data.synthetic import NLVR_FAMILIES, nlvr_family
from models.blip import BLIP_DEFAULTS
from models.blip_nlvr import BlipNLVR
from tasks.common import DATA_DEFAULTS, blip_loader, build_loaders, model_device
from tasks.metrics import wilson_interval

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    **BLIP_DEFAULTS,
    "image_size": 384,
    "batch_size_train": 32,
    "batch_size_test": 128,
    "nlvr_eval_swap": True,
    # Batch the statements of one image pair together and encode its images once (data.nlvr.NLVRPairDataset).
    # Off, as in BLIP: every statement is its own item. The batch sizes still count statements: a loader takes
    # batch_size / (statements per pair of the split) pairs per batch.
    "nlvr_group_pairs": False,
}


def _pairs_per_batch(batch_size: int, dataset) -> int:
    return max(1, round(batch_size * len(dataset) / max(1, dataset.num_statements)))


def build_data(config: dict, dist: utils.DistInfo):
    train, val, test = create_dataset("nlvr", config)
    if not isinstance(train, NLVRPairDataset):
        return build_loaders(config, dist, train, {"val": val, "test": test})
    sizes = (_pairs_per_batch(config["batch_size_train"], train), _pairs_per_batch(config["batch_size_test"], val))
    return build_loaders(
        config, dist, train, {"val": val, "test": test}, collate_pairs, eval_collate_fn=collate_pairs, batch_sizes=sizes
    )


def _run(model, batch):
    """The model on a plain batch (images stacked [image0; image1]) or an NLVRPairBatch (``pairs`` passed on).
    Returns (logits, targets on the CPU, sentences)."""
    device = model_device(model)
    if isinstance(batch, NLVRPairBatch):
        images, pairs, text, labels = batch
        extra = {"pairs": pairs.to(device)}
    else:
        image0, image1, text, labels = batch
        images, text, extra = torch.cat([image0, image1]), list(text), {}
    return model(images.to(device, non_blocking=True), text, **extra), labels, text


def _image_rows(batch) -> torch.Tensor:
    """(B, 2): the rows of the image encoder's batch that each statement reads (its two images)."""
    if isinstance(batch, NLVRPairBatch):
        return batch.pairs
    n = len(batch[2])
    return torch.stack([torch.arange(n), torch.arange(n, 2 * n)], dim=1)


def build_model(config: Mapping) -> BlipNLVR:
    return BlipNLVR(config, image_size=config["image_size"])


class NLVRTask:
    name = "nlvr"
    main_metric = "acc"

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        logits, labels, _ = _run(model, batch)
        loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return {"loss": loss, "logits": logits, "image_rows": _image_rows(batch)}

    def teacher_logits(self, teacher, batch) -> torch.Tensor:
        return _run(teacher, batch)[0]

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        """Accuracy; on the synthetic world also ``by_statement``, the accuracy of each statement family, which
        shows what a weak model gets wrong (it is left out when any sentence is not the world's)."""
        correct = total = 0.0
        family_hits = {f: [0.0, 0.0] for f in NLVR_FAMILIES}  # family -> [correct, total]
        for batch in utils.progress(loader, desc=f"eval {split}"):
            logits, targets, text = _run(model, batch)
            hits = (logits.argmax(1).cpu() == targets).tolist()
            correct += sum(hits)
            total += len(hits)
            for sentence, hit in zip(text, hits):
                family = nlvr_family(sentence)
                if family is not None:
                    family_hits[family][0] += hit
                    family_hits[family][1] += 1
        sums = utils.all_reduce_sum([correct, total, *(x for pair in family_hits.values() for x in pair)])
        c, n = sums[:2]
        out: dict[str, Any] = {"acc": 100.0 * c / max(n, 1), "acc_ci95": wilson_interval(c, n), "n": int(n)}
        per_family = dict(zip(NLVR_FAMILIES, zip(sums[2::2], sums[3::2])))
        if n and sum(fn for _, fn in per_family.values()) == n:
            out["by_statement"] = {f: 100.0 * fc / fn for f, (fc, fn) in per_family.items() if fn}
        return out


def build_task(config: Mapping, train_loader) -> NLVRTask:
    return NLVRTask()


load_pretrained = blip_loader("nlvr")
