"""BLIP pre-training (ITC + ITM + LM) on image-caption pairs, evaluated by retrieval on the val split.

Real BLIP pre-training (14M-129M images) is out of scope; this serves the synthetic world, whose
tiny pre-trained BLIP is the starting point of every vision-language demo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from models.blip_pretrain import BlipPretrain
from models.checkpoints import load_vit_weights
from tasks import retrieval
from tasks.common import blip_loader, model_device

SCHEMA: dict[str, Any] = {
    **retrieval.SCHEMA,
    "image_size": 224,
    "negative_all_rank": False,
    "vit_init": "",  # a classification checkpoint to start the ViT from (BLIP starts from an ImageNet ViT)
}
build_data = retrieval.build_data


def build_model(config: Mapping) -> BlipPretrain:
    model = BlipPretrain(
        config,
        image_size=config["image_size"],
        queue_size=config["queue_size"],
        momentum=config["momentum"],
        negative_all_rank=config["negative_all_rank"],
    )
    if config["vit_init"]:
        load_vit_weights(model.visual_encoder, config["vit_init"])
        model.reset_momentum()
    return model


class PretrainTask(retrieval.RetrievalTask):
    name = "pretrain"

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        image, caption, idx = batch
        device = model_device(model)
        alpha = self.config["alpha"] * (min(1.0, info.step / max(info.steps_per_epoch, 1)) if info.epoch == 0 else 1)
        ita, itm, lm = model(image.to(device, non_blocking=True), list(caption), alpha, idx.to(device))
        return {"loss": ita + itm + lm, "loss_ita": ita, "loss_itm": itm, "loss_lm": lm}


def build_task(config: Mapping, train_loader) -> PretrainTask:
    return PretrainTask(config, len(train_loader))


load_pretrained = blip_loader("pretrain")
