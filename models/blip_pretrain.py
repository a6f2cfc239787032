"""BLIP pre-training objective (ITC + ITM + LM) in the official pre-trained checkpoint layout.

Used to pre-train the tiny demo BLIP on the synthetic world's captions, so that the task demos
fine-tune from a pre-trained file exactly as real runs fine-tune from ``model_base.pth``. As in BLIP,
the decoder shares every text-encoder module except its self-attention (the pre-trained file lists the
shared tensors under both names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from models.blip import decoder_batch, med_config
from models.blip_retrieval import BlipRetrieval
from models.med import BertLMHeadModel, BertOnlyMLMHead


class BlipPretrain(BlipRetrieval):
    task = "pretrain"
    TOWERS = ("visual_encoder", "text_encoder", "text_decoder")
    QUEUE_POINTER = "queue_ptr"
    IDX_QUEUE_SAVED = False  # image ids are used for ITC positives but are not part of the file
    cost_probe = None  # pre-training has no seed convention for FLOPs

    def __init__(self, config: Mapping[str, Any], image_size: int = 224, tokenizer=None, **kw):
        super().__init__(config, image_size=image_size, tokenizer=tokenizer, **kw)
        vision_width = self.visual_encoder.embed_dim
        self.text_decoder = BertLMHeadModel(med_config(config, self.tokenizer, vision_width))
        tie_encoder_decoder(self.text_encoder, self.text_decoder.bert)
        # The LM head reads the (now shared) word embeddings.
        self.text_decoder.cls = BertOnlyMLMHead(
            self.text_decoder.config, self.text_decoder.bert.embeddings.word_embeddings
        )
        self.text_decoder.cls.apply(self.text_decoder.bert._init_weights)

    def forward(self, image: Tensor, caption: list[str], alpha: float, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(ITC, ITM, LM) losses; ``idx`` identifies images so that captions of one image are positives."""
        loss_ita, loss_itm, (embeds, atts) = self.contrastive_losses(image, caption, alpha, idx)
        text, targets = decoder_batch(self.tokenizer, caption, image.device, 30)
        loss_lm = self.text_decoder(text.input_ids, text.attention_mask, embeds, atts, labels=targets).loss
        return loss_ita, loss_itm, loss_lm


def tie_encoder_decoder(encoder, decoder) -> None:
    """Make ``decoder`` (a BertModel) reuse every module of ``encoder`` except the self-attention."""
    decoder.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers, strict=True):
        for name, child in enc_layer.named_children():
            if name != "attention":
                setattr(dec_layer, name, child)
