"""BLIP for NLVR2: two images, one sentence, true/false."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from models.blip import PrunableTowers, build_tokenizer, create_vit, encode_image, med_config, tokenize
from models.med import BertModel


class BlipNLVR(PrunableTowers, nn.Module):
    """``visual_encoder`` sees both images as one batch; the text encoder's every layer has two
    cross-attention branches (image 0 and image 1), averaged in layers < 6 and merged by
    ``merge_layer`` above; ``cls_head`` maps the final [ENC] state to two classes (1 = True), or to
    ``num_classes`` (three for the text-assignment pre-training of ``tasks.text_assignment``)."""

    task = "nlvr"
    TOWERS = ("visual_encoder", "text_encoder")

    def __init__(self, config: Mapping[str, Any], image_size: int = 384, tokenizer=None, num_classes: int = 2):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(config, image_size, drop_path_rate=0.1)
        self.tokenizer = tokenizer or build_tokenizer(config)
        cfg = med_config(config, self.tokenizer, vision_width)
        self.text_encoder = BertModel(
            cfg, add_pooling_layer=False, twin_cross_attention=True, merge_from=cfg.num_hidden_layers // 2
        )
        hidden = cfg.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        for m in self.cls_head:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=cfg.initializer_range)
                nn.init.zeros_(m.bias)

    def forward(
        self, image: Tensor, text: list[str], targets: Tensor | None = None, pairs: Tensor | None = None
    ) -> Tensor:
        """``image`` is [images0; images1] stacked (2B, 3, H, W), or, with ``pairs`` ((B, 2) long), any set
        of images of which sentence ``b`` reads rows ``pairs[b]`` (each image is encoded once however many
        sentences read it). Returns the loss when ``targets`` is given, else the logits (B, 2)."""
        image_embeds, image_atts = encode_image(self.visual_encoder, image)
        if pairs is None:
            (e0, e1), (a0, a1) = image_embeds.chunk(2, dim=0), image_atts.chunk(2, dim=0)
        else:
            e0, e1 = image_embeds[pairs[:, 0]], image_embeds[pairs[:, 1]]
            a0, a1 = image_atts[pairs[:, 0]], image_atts[pairs[:, 1]]
        t = tokenize(self.tokenizer, text, image.device, first=self.tokenizer.enc_token_id, padding="longest")
        hidden = self.text_encoder(t.input_ids, t.attention_mask, [e0, e1], [a0, a1])
        logits = self.cls_head(hidden[:, 0])
        if targets is None:
            return logits
        return F.cross_entropy(logits.float(), targets)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)
