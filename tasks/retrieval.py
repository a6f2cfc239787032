"""COCO / Flickr30k image-text retrieval: ITC + ITM fine-tuning, evaluation with k_test ITM re-ranking."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import utils
from data import create_dataset
from models.blip import BLIP_DEFAULTS
from models.blip_retrieval import BlipRetrieval
from models.token_ops import pad_tokens
from tasks.common import DATA_DEFAULTS, blip_loader, build_loaders, model_device
from tasks.metrics import retrieval_metrics

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    **BLIP_DEFAULTS,
    "dataset": "coco",
    "image_size": 384,
    "batch_size_train": 32,
    "batch_size_test": 64,
    "queue_size": 57600,
    "alpha": 0.4,
    "momentum": 0.995,  # EMA rate of the momentum towers
    "k_test": 256,
    "negative_all_rank": True,
    "reset_momentum": False,  # True: re-copy online -> momentum towers after loading (UPop); False: BLIP
}


def build_data(config: dict, dist: utils.DistInfo):
    train, val, test = create_dataset(f"retrieval_{config['dataset']}", config)
    # Every rank reads the whole evaluation split (the score matrices are filled by row slices).
    return build_loaders(config, dist, train, {"val": val, "test": test}, shard_eval=False)


def build_model(config: Mapping) -> BlipRetrieval:
    return BlipRetrieval(
        config,
        image_size=config["image_size"],
        queue_size=config["queue_size"],
        momentum=config["momentum"],
        negative_all_rank=config["negative_all_rank"],
    )


class RetrievalTask:
    name = "retrieval"
    main_metric = "r_mean"

    def __init__(self, config: Mapping, steps_per_epoch: int):
        self.config = config
        self.steps_per_epoch = steps_per_epoch

    def alpha(self, info) -> float:
        """The weight of the momentum-distillation targets, ramped up over the first epoch as in the seeds."""
        alpha = self.config["alpha"]
        if info.epoch == 0:
            alpha *= min(1.0, info.step / max(info.steps_per_epoch, 1))
        return alpha

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        image, caption, idx = batch
        device = model_device(model)
        alpha = self.alpha(info)
        loss_ita, loss_itm = model(image.to(device, non_blocking=True), list(caption), alpha, idx.to(device))
        return {"loss": loss_ita + loss_itm, "loss_ita": loss_ita, "loss_itm": loss_itm}

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        i2t, t2i = score_matrices(model, loader, self.config["k_test"])
        ds = loader.dataset
        return retrieval_metrics(i2t.cpu(), t2i.cpu(), ds.txt2img, ds.img2txt)


@torch.no_grad()
def score_matrices(
    model: BlipRetrieval, loader, k_test: int, text_batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) scores: ITC cosine for all pairs, then the top ``k_test`` of each row re-scored as
    ITM logit + cosine; rows are split over ranks and summed (other entries stay -100)."""
    device = model_device(model)
    texts = loader.dataset.text
    ids, masks, text_feats = [], [], []
    for i in utils.progress(range(0, len(texts), text_batch), desc="encode texts"):
        t = model.text_inputs(texts[i : i + text_batch], device)
        text_feats.append(model.text_features(t.input_ids, t.attention_mask))
        ids.append(t.input_ids)
        masks.append(t.attention_mask)
    text_ids, text_masks, text_feats = torch.cat(ids), torch.cat(masks), torch.cat(text_feats)
    text_ids[:, 0] = model.tokenizer.enc_token_id

    image_embeds, image_atts, image_feats = [], [], []
    for image, _ in utils.progress(loader, desc="encode images"):
        embeds, atts, feat = model.image_features(image.to(device))
        image_embeds.append(embeds)
        image_atts.append(atts)
        image_feats.append(feat)
    # Token-reduced batches may differ in length: padded with zeros that the mask hides, never with copies.
    image_embeds, image_atts = pad_tokens(image_embeds, image_atts)
    image_feats = torch.cat(image_feats)

    sims = image_feats @ text_feats.t()
    n_img, n_txt = sims.shape
    world, rank = utils.get_world_size(), utils.get_rank()
    i2t = torch.full((n_img, n_txt), -100.0, device=device)
    t2i = torch.full((n_txt, n_img), -100.0, device=device)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)

    step = n_img // world + 1
    for i in utils.progress(range(rank * step, min(n_img, (rank + 1) * step)), desc="rerank i2t"):
        top_sim, top_idx = sims[i].topk(k_i2t)
        enc, enc_atts = image_embeds[i : i + 1].expand(k_i2t, -1, -1), image_atts[i : i + 1].expand(k_i2t, -1)
        logits = model.itm_logits(text_ids[top_idx], text_masks[top_idx], enc, enc_atts)
        i2t[i, top_idx] = logits[:, 1].float() + top_sim

    sims_t = sims.t()
    step = n_txt // world + 1
    for j in utils.progress(range(rank * step, min(n_txt, (rank + 1) * step)), desc="rerank t2i"):
        top_sim, top_idx = sims_t[j].topk(k_t2i)
        logits = model.itm_logits(
            text_ids[j : j + 1].expand(k_t2i, -1),
            text_masks[j : j + 1].expand(k_t2i, -1),
            image_embeds[top_idx],
            image_atts[top_idx],
        )
        t2i[j, top_idx] = logits[:, 1].float() + top_sim

    if utils.is_dist():
        torch.distributed.all_reduce(i2t)
        torch.distributed.all_reduce(t2i)
    return i2t, t2i


def build_task(config: Mapping, train_loader) -> RetrievalTask:
    return RetrievalTask(config, len(train_loader))


def load_pretrained(model, path: str, config: Mapping, evaluate: bool = False) -> None:
    blip_loader("retrieval", reset_momentum=config["reset_momentum"])(model, path, config, evaluate)
