"""BLIP image captioning: ViT + MED decoder with a text prompt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from models.blip import PrunableTowers, build_tokenizer, create_vit, decoder_batch, encode_image, med_config, tokenize
from models.med import BertLMHeadModel


class BlipCaption(PrunableTowers, nn.Module):
    task = "caption"
    TOWERS = ("visual_encoder", "text_decoder")

    def __init__(self, config: Mapping[str, Any], image_size: int = 384, tokenizer=None, prompt: str = "a picture of "):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(config, image_size, drop_path_rate=0.0)
        self.tokenizer = tokenizer or build_tokenizer(config)
        self.text_decoder = BertLMHeadModel(med_config(config, self.tokenizer, vision_width))
        self.prompt = prompt
        # [CLS] + prompt words, without [SEP]: these positions are context, never targets.
        self.prompt_length = len(self.tokenizer(prompt).input_ids) - 1

    def _image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return encode_image(self.visual_encoder, image)

    def forward(self, image: Tensor, caption: list[str]) -> Tensor:
        """Label-smoothed LM loss (token mean) of ``caption`` (which already starts with the prompt)."""
        embeds, atts = self._image(image)
        text, targets = decoder_batch(self.tokenizer, caption, image.device, 40, self.prompt_length)
        return self.text_decoder(text.input_ids, text.attention_mask, embeds, atts, labels=targets).loss

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        sample: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """Captions for a batch of images; lengths count the prompt tokens, as in the seed."""
        embeds, atts = self._image(image)
        prompt = tokenize(
            self.tokenizer, [self.prompt] * image.shape[0], image.device, first=self.tokenizer.bos_token_id
        )
        ids = prompt.input_ids[:, :-1]  # drop the trailing [SEP]
        out = self.text_decoder.generate(
            ids,
            embeds,
            atts,
            sample=sample,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t[len(self.prompt) :] for t in texts]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_decoder.set_grad_checkpointing(enable)
