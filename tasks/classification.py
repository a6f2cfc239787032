"""Image classification (ImageNet ImageFolder layout) with a ViT / DeiT backbone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data import create_dataset
from engine import StepInfo
from models.vit import VisionTransformer, vit_config
from tasks.common import DATA_DEFAULTS, build_loaders
from tasks.metrics import wilson_interval

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    "image_size": 224,
    "batch_size_train": 128,
    "batch_size_test": 256,
    "crop_scale": [0.08, 1.0],
    "interpolation": "bicubic",
    "eval_crop_ratio": 0.875,
    "smoothing": 0.1,
    # the backbone: a preset of models.vit.vit_config, each field overridable
    "vit": "deit_small",
    "patch_size": None,
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "drop_path_rate": 0.1,
    "num_classes": None,  # None: the number of class folders
}


def build_data(config: dict, dist: utils.DistInfo):
    train_set, val_set = create_dataset("imagenet", config)
    if config["num_classes"] is None:
        config["num_classes"] = len(train_set.classes)
    elif config["num_classes"] != len(train_set.classes):
        raise ValueError(
            f"num_classes is {config['num_classes']} but {config['image_root']}/train holds "
            f"{len(train_set.classes)} class folders"
        )
    return build_loaders(config, dist, train_set, {"val": val_set})


def build_model(config: Mapping) -> VisionTransformer:
    arch = dict(vit_config(config["vit"]))
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if config[key] is not None:
            arch[key] = config[key]
    return VisionTransformer(
        img_size=config["image_size"],
        num_classes=config["num_classes"],
        drop_path_rate=config["drop_path_rate"],
        **arch,
    )


class ClassificationTask:
    name = "classification"
    main_metric = "acc1"

    def __init__(self, smoothing: float = 0.0):
        self.smoothing = smoothing

    def train_step(self, model, batch, info: StepInfo) -> dict[str, torch.Tensor]:
        """Label-smoothed cross-entropy of the class logits; the logits (a (class, distillation) pair for a
        distilled DeiT in training) go back for distillation."""
        images, labels = batch
        device = next(model.parameters()).device
        logits = model(images.to(device, non_blocking=True))
        cls = logits[0] if isinstance(logits, tuple) else logits
        loss = F.cross_entropy(cls.float(), labels.to(device), label_smoothing=self.smoothing)
        return {"loss": loss, "logits": logits}

    def teacher_logits(self, teacher, batch) -> torch.Tensor:
        """The frozen teacher's logits for the same images (eval mode: a distilled teacher averages its heads)."""
        return teacher(batch[0].to(next(teacher.parameters()).device, non_blocking=True))

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        device = next(model.parameters()).device
        correct1 = correct5 = total = 0.0
        for images, labels in utils.progress(loader, desc=f"eval {split}"):
            logits = model(images.to(device)).float()
            labels = labels.to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += float((top[:, 0] == labels).sum())
            correct5 += float((top == labels[:, None]).any(dim=1).sum())
            total += labels.numel()
        c1, c5, n = utils.all_reduce_sum([correct1, correct5, total])
        return {
            "acc1": 100.0 * c1 / max(n, 1),
            "acc1_ci95": wilson_interval(c1, n),
            "acc5": 100.0 * c5 / max(n, 1),
            "n": int(n),
        }


def build_task(config: Mapping, train_loader) -> ClassificationTask:
    return ClassificationTask(config["smoothing"])


def load_pretrained(model: torch.nn.Module, path: str, config: Mapping, evaluate: bool = False) -> None:
    """Weights from a checkpoint of this project (dense or compressed) or a timm/DeiT state dict with the
    same layout, every key required; a compressed file first cuts the model to its widths (described, or
    inferred with ``infer_arch``)."""
    from models.arch import fit_to_checkpoint, read_weights

    sd, arch = read_weights(path)
    fit_to_checkpoint(model, sd, arch, str(path), infer=config.get("infer_arch", False))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise utils.CheckpointError(
            f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
