"""COCO / Flickr30k image-text retrieval with CLIP (the UPop / MADTP forks' ``compress_retrieval_clip.py``): ITC with
momentum distillation and queues for fine-tuning, evaluation by cosine similarity (no re-ranking), on the same
annotation files and transforms as BLIP retrieval."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import utils
from models.clip import ClipArch, ClipRetrieval
from tasks.common import DATA_DEFAULTS, model_device
from tasks.metrics import retrieval_metrics
from tasks.retrieval import (
    RetrievalTask,
    build_data,  # noqa: F401  (the same splits and loaders as BLIP retrieval)
)

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    "dataset": "coco",
    "image_size": 336,
    "batch_size_train": 32,
    "batch_size_test": 64,
    # An OpenAI model (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px; image_size wins over the preset's) or "auto":
    # the sizes are read from the weights file (`pretrained`). clip_arch overrides single sizes (the demo's model).
    "clip_model": "ViT-L/14",
    "clip_arch": dict.fromkeys(ClipArch.fields()),
    "queue_size": 57600,  # the forks hard-code 57600 whatever their config says
    "alpha": 0.4,
    "momentum": 0.995,
    "reset_momentum": True,  # the forks copy the online towers into the momentum ones after every load
    "parity_momentum_ln_final": False,  # UPop fork: the momentum text path uses the online ln_final
    "trust_torchscript": False,  # read OpenAI's TorchScript .pt files (deserialises code); convert them instead
    "text_batch": 256,
}


def clip_arch(config: Mapping) -> ClipArch:
    """The architecture the config asks for (``clip_model: auto`` reads it from the ``pretrained`` file)."""
    overrides = {k: v for k, v in (config.get("clip_arch") or {}).items() if v is not None}
    if config["clip_model"] != "auto":
        return ClipArch.from_config(config["clip_model"], overrides, image_size=config["image_size"])
    from models.clip_checkpoints import infer_arch, read_clip_weights

    path = config.get("pretrained")
    if not path:
        raise ValueError("clip_model: auto reads the architecture from `pretrained`, which is not set")
    sd, _, facts = read_clip_weights(path, config["trust_torchscript"])
    arch = infer_arch(sd, str(path), act=facts.get("act", "quick_gelu"))
    values = {**{f: getattr(arch, f) for f in ClipArch.fields()}, **overrides}
    if values["image_size"] != config["image_size"]:
        raise ValueError(
            f"{path} holds a CLIP for {values['image_size']} px images but image_size is {config['image_size']}; "
            "CLIP position embeddings are not resampled"
        )
    return ClipArch(**values)


def build_model(config: Mapping) -> ClipRetrieval:
    arch = clip_arch(config)
    return ClipRetrieval(
        arch,
        queue_size=config["queue_size"],
        momentum=config["momentum"],
        parity_momentum_ln_final=config["parity_momentum_ln_final"],
    )


def load_pretrained(model: ClipRetrieval, path: str, config: Mapping, evaluate: bool = False) -> None:
    """Any CLIP file (OpenAI / open_clip / the forks' fine-tuned or UPop-compressed files, a Hugging Face folder, this
    project's checkpoints), cut to its widths (described, or inferred with ``infer_arch``) and loaded strictly."""
    from models.arch import fit_to_checkpoint
    from models.clip_checkpoints import load_clip_checkpoint, read_clip_weights

    sd, arch, facts = read_clip_weights(path, config["trust_torchscript"])
    if facts.get("act", model.arch.act) != model.arch.act:
        raise ValueError(f"{path} uses {facts['act']} but the model is built with {model.arch.act} (clip_arch.act)")
    fit_to_checkpoint(model, sd, arch, str(path), infer=config.get("infer_arch", False))
    load_clip_checkpoint(model, sd, str(path), evaluate=evaluate, reset_momentum=config["reset_momentum"])


class ClipRetrievalTask(RetrievalTask):
    """BLIP retrieval's task without ITM: the ITC loss alone, and evaluation by cosine similarity."""

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        image, caption, idx = batch
        device = model_device(model)
        loss = model(image.to(device, non_blocking=True), list(caption), self.alpha(info), idx.to(device))
        return {"loss": loss, "loss_ita": loss}

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        i2t = similarity(model, loader, self.config["text_batch"])
        ds = loader.dataset
        return retrieval_metrics(i2t.cpu(), i2t.t().cpu(), ds.txt2img, ds.img2txt)


@torch.no_grad()
def similarity(model: ClipRetrieval, loader, text_batch: int = 256) -> torch.Tensor:
    """Cosine similarities (images x texts) of a whole split; every rank computes all of them, as the forks do."""
    device = model_device(model)
    texts = loader.dataset.text
    text_feats = []
    for i in utils.progress(range(0, len(texts), text_batch), desc="encode texts"):
        batch = model.text_inputs(texts[i : i + text_batch], device)
        text_feats.append(model.text_features(batch.input_ids))
    image_feats = [model.image_features(image.to(device))[2] for image, _ in utils.progress(loader, desc="images")]
    return torch.cat(image_feats) @ torch.cat(text_feats).t()


def build_task(config: Mapping, train_loader) -> ClipRetrievalTask:
    return ClipRetrievalTask(config, len(train_loader))
