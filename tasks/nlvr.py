"""NLVR2: is the sentence true of the pair of images? Accuracy on dev (val) and test-P (test)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import utils
from data import create_dataset
from models.blip import BLIP_DEFAULTS
from models.blip_nlvr import BlipNLVR
from tasks.common import DATA_DEFAULTS, blip_loader, build_loaders, model_device

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    **BLIP_DEFAULTS,
    "image_size": 384,
    "batch_size_train": 32,
    "batch_size_test": 128,
    "nlvr_eval_swap": True,
}


def build_data(config: dict, dist: utils.DistInfo):
    train, val, test = create_dataset("nlvr", config)
    return build_loaders(config, dist, train, {"val": val, "test": test})


def build_model(config: Mapping) -> BlipNLVR:
    return BlipNLVR(config, image_size=config["image_size"])


class NLVRTask:
    name = "nlvr"
    main_metric = "acc"

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        image0, image1, text, targets = batch
        device = model_device(model)
        images = torch.cat([image0, image1]).to(device, non_blocking=True)
        return {"loss": model(images, list(text), targets.to(device))}

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        device = model_device(model)
        correct = total = 0.0
        for image0, image1, text, targets in utils.progress(loader, desc=f"eval {split}"):
            logits = model(torch.cat([image0, image1]).to(device), list(text))
            correct += float((logits.argmax(1).cpu() == targets).sum())
            total += targets.numel()
        c, n = utils.all_reduce_sum([correct, total])
        return {"acc": 100.0 * c / max(n, 1), "n": int(n)}


def build_task(config: Mapping, train_loader) -> NLVRTask:
    return NLVRTask()


load_pretrained = blip_loader("nlvr")
