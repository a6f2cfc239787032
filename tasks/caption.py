"""COCO captioning (Karpathy split): LM fine-tuning, beam-search generation, COCO caption metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import utils
from data import create_dataset
from models.blip import BLIP_DEFAULTS
from models.blip_caption import BlipCaption
from tasks.common import DATA_DEFAULTS, blip_loader, build_loaders, model_device
from tasks.metrics import coco_caption_scores, collect_results

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    **BLIP_DEFAULTS,
    "coco_gt_root": "annotation/coco_gt",
    "image_size": 384,
    "batch_size_train": 32,
    "batch_size_test": 32,
    "prompt": "a picture of ",
    "max_length": 20,
    "min_length": 5,
    "num_beams": 3,
    "spice": False,  # SPICE downloads Stanford models on first use: opt-in only
    "meteor": True,
}


def build_data(config: dict, dist: utils.DistInfo):
    train, val, test = create_dataset("caption_coco", config)
    return build_loaders(config, dist, train, {"val": val, "test": test})


def build_model(config: Mapping) -> BlipCaption:
    return BlipCaption(config, image_size=config["image_size"], prompt=config["prompt"])


class CaptionTask:
    name = "caption"
    # The seed selects the epoch by val CIDEr + Bleu_4.
    main_metric = "CIDEr+Bleu_4"

    def __init__(self, config: Mapping):
        self.config = config
        # Per-sample result files: <output_dir>/result, or a folder of an evaluation's own (set by the entry script).
        self.result_dir = Path(config.get("_result_dir") or Path(config["_output_dir"]) / "result")

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        image, caption, _ = batch
        return {"loss": model(image.to(model_device(model), non_blocking=True), list(caption))}

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        device = model_device(model)
        c = self.config
        results = []
        for image, image_id in utils.progress(loader, desc=f"caption {split}"):
            captions = model.generate(
                image.to(device), num_beams=c["num_beams"], max_length=c["max_length"], min_length=c["min_length"]
            )
            results += [{"image_id": int(i), "caption": t} for i, t in zip(image_id, captions)]
        merged = collect_results(results, self.result_dir, f"caption_{split}", dedup_key="image_id")
        scores = None
        if utils.is_main_process():
            gt = Path(c["coco_gt_root"]) / f"coco_karpathy_{split}_gt.json"
            scores = coco_caption_scores(gt, merged, spice=c["spice"], meteor=c["meteor"])
            scores["CIDEr+Bleu_4"] = scores["CIDEr"] + scores["Bleu_4"]
            scores["n"] = len(merged)
        return utils.broadcast_object(scores)


def build_task(config: Mapping, train_loader) -> CaptionTask:
    return CaptionTask(config)


load_pretrained = blip_loader("caption")
