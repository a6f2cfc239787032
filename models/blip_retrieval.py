"""BLIP for image-text retrieval: ITC with momentum distillation and queues, ITM with hard negatives,
and the helpers of k_test re-ranking evaluation."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blip import (
    PrunableTowers,
    all_gather_with_grad,
    build_tokenizer,
    concat_all_gather,
    copy_params,
    create_vit,
    encode_image,
    med_config,
    momentum_update,
    tokenize,
)
from models.med import BertModel

TEXT_LENGTH = 35  # ITC/ITM texts are padded (and truncated) to exactly this many tokens


class BlipRetrieval(PrunableTowers, nn.Module):
    task = "retrieval"
    TOWERS = ("visual_encoder", "text_encoder")
    # Buffer names differ between the fine-tuned and the pre-trained file layouts.
    QUEUE_POINTER = "ptr_queue"
    IDX_QUEUE_SAVED = True

    def __init__(
        self,
        config: Mapping[str, Any],
        image_size: int = 384,
        tokenizer=None,
        embed_dim: int = 256,
        queue_size: int = 57600,
        momentum: float = 0.995,
        negative_all_rank: bool = False,
    ):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(config, image_size, drop_path_rate=0.0)
        self.tokenizer = tokenizer or build_tokenizer(config)
        cfg = med_config(config, self.tokenizer, vision_width)
        self.text_encoder = BertModel(cfg, add_pooling_layer=False)
        text_width = cfg.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        # Momentum towers: same architecture, never trained by the optimizer (EMA of the online towers).
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.visual_encoder_m.set_grad_checkpointing(False)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(cfg, add_pooling_layer=False)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        copy_params(self.model_pairs)

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer(
            "idx_queue", torch.full((1, queue_size), -100, dtype=torch.long), persistent=self.IDX_QUEUE_SAVED
        )
        self.register_buffer(self.QUEUE_POINTER, torch.zeros(1, dtype=torch.long))
        self.queue_size = queue_size
        self.momentum = momentum
        self.negative_all_rank = negative_all_rank
        self.temp = nn.Parameter(0.07 * torch.ones([]))

    @property
    def model_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    def reset_momentum(self) -> None:
        copy_params(self.model_pairs)

    # ------------------------------------------------------------------------------------------ encoders
    def image_features(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image tokens (B, N', Dv), their padding mask (B, N'), normalised ITC embedding of the CLS token (B, E));
        N' is 1 + N unless token hooks reduced the tokens."""
        embeds, atts = encode_image(self.visual_encoder, image)
        return embeds, atts, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def text_inputs(self, text: list[str], device: torch.device):
        return tokenize(self.tokenizer, text, device, padding="max_length", truncation=True, max_length=TEXT_LENGTH)

    def text_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Normalised ITC embedding of the [CLS] state in text mode (B, E)."""
        out = self.text_encoder(ids, mask, mode="text")
        return F.normalize(self.text_proj(out[:, 0]), dim=-1)

    def itm_logits(self, ids: Tensor, mask: Tensor, image_embeds: Tensor, image_atts: Tensor | None = None) -> Tensor:
        """ITM logits (B, 2) of texts (first token already [ENC]) against image token sequences, which may be
        padded (``image_atts`` 0 on padding; ``None``: every token is real)."""
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(ids, mask, image_embeds, image_atts)
        return self.itm_head(out[:, 0])

    # ------------------------------------------------------------------------------------------ training
    def forward(self, image: Tensor, caption: list[str], alpha: float, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (ITC loss, ITM loss) for a batch of images, their captions and image indices."""
        loss_ita, loss_itm, _ = self.contrastive_losses(image, caption, alpha, idx)
        return loss_ita, loss_itm

    def contrastive_losses(
        self, image: Tensor, caption: list[str], alpha: float, idx: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """(ITC loss, ITM loss, (image tokens, their padding mask)), the tokens for objectives built on top."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_atts, image_feat = self.image_features(image)
        text = self.text_inputs(caption, image.device)
        text_feat = self.text_features(text.input_ids, text.attention_mask)

        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        pos = torch.eq(idx, idx_all).float()
        sim_targets = pos / pos.sum(1, keepdim=True)

        with torch.no_grad():
            momentum_update(self.model_pairs, self.momentum)
            image_embeds_m = self.visual_encoder_m.forward_features(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_out_m = self.text_encoder_m(text.input_ids, text.attention_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_out_m[:, 0]), dim=-1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_targets = (
                alpha * F.softmax(image_feat_m @ text_feat_m_all / self.temp, dim=1) + (1 - alpha) * sim_targets
            )
            sim_t2i_targets = (
                alpha * F.softmax(text_feat_m @ image_feat_m_all / self.temp, dim=1) + (1 - alpha) * sim_targets
            )

        sim_i2t = image_feat @ text_feat_m_all / self.temp
        sim_t2i = text_feat @ image_feat_m_all / self.temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets).sum(1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2

        idxs = concat_all_gather(idx)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idxs)

        # ITM with hard negatives drawn from the in-batch (or all-rank) similarity distribution.
        enc_ids = text.input_ids.clone()
        enc_ids[:, 0] = self.tokenizer.enc_token_id
        bs = image.shape[0]
        out_pos = self.text_encoder(enc_ids, text.attention_mask, image_embeds, image_atts)

        if self.negative_all_rank:
            with torch.no_grad():
                mask = torch.eq(idx, idxs.t())
                image_feat_world = concat_all_gather(image_feat)
                text_feat_world = concat_all_gather(text_feat)
                w_i2t = F.softmax(image_feat @ text_feat_world.t() / self.temp, dim=1).masked_fill(mask, 0)
                w_t2i = F.softmax(text_feat @ image_feat_world.t() / self.temp, dim=1).masked_fill(mask, 0)
            image_embeds_world = all_gather_with_grad(image_embeds)
            image_atts_world = concat_all_gather(image_atts)
            ids_world = concat_all_gather(enc_ids)
            att_world = concat_all_gather(text.attention_mask)
        else:
            with torch.no_grad():
                mask = torch.eq(idx, idx.t())
                w_i2t = F.softmax(image_feat @ text_feat.t() / self.temp, dim=1).masked_fill(mask, 0)
                w_t2i = F.softmax(text_feat @ image_feat.t() / self.temp, dim=1).masked_fill(mask, 0)
            image_embeds_world, image_atts_world = image_embeds, image_atts
            ids_world, att_world = enc_ids, text.attention_mask

        neg_img = torch.multinomial(_safe_rows(w_t2i), 1).squeeze(1)
        neg_txt = torch.multinomial(_safe_rows(w_i2t), 1).squeeze(1)
        image_embeds_neg, image_atts_neg = image_embeds_world[neg_img], image_atts_world[neg_img]
        text_ids_neg, text_atts_neg = ids_world[neg_txt], att_world[neg_txt]

        ids_all = torch.cat([enc_ids, text_ids_neg], dim=0)
        atts_all = torch.cat([text.attention_mask, text_atts_neg], dim=0)
        image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
        image_atts_all = torch.cat([image_atts_neg, image_atts], dim=0)
        out_neg = self.text_encoder(ids_all, atts_all, image_embeds_all, image_atts_all)

        cls = torch.cat([out_pos[:, 0], out_neg[:, 0]], dim=0)
        logits = self.itm_head(cls)
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(image.device)
        loss_itm = F.cross_entropy(logits.float(), labels)
        return loss_ita, loss_itm, (image_embeds, image_atts)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: Tensor, text_feat: Tensor, idxs: Tensor) -> None:
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        n = image_feats.shape[0]
        pointer = getattr(self, self.QUEUE_POINTER)
        ptr = int(pointer)
        if self.queue_size % n:
            raise ValueError(f"queue_size {self.queue_size} must be a multiple of the global batch {n}")
        self.image_queue[:, ptr : ptr + n] = image_feats.T
        self.text_queue[:, ptr : ptr + n] = text_feats.T
        self.idx_queue[:, ptr : ptr + n] = idxs.T
        pointer[0] = (ptr + n) % self.queue_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)


def _safe_rows(w: Tensor) -> Tensor:
    """Multinomial needs a positive row sum; a row with every candidate masked (all captions of one image
    in the batch) falls back to uniform over the other entries."""
    w = w.float()
    empty = w.sum(1, keepdim=True) <= 0
    return torch.where(empty, torch.ones_like(w), w)
