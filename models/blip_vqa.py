"""BLIP for VQA: image-grounded question encoder + answer decoder; answers are ranked over a candidate
list or generated (as in BLIP's blip_vqa.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blip import PrunableTowers, build_tokenizer, create_vit, encode_image, lm_targets, med_config, tokenize
from models.med import BertLMHeadModel, BertModel


class BlipVQA(PrunableTowers, nn.Module):
    task = "vqa"
    TOWERS = ("visual_encoder", "text_encoder", "text_decoder")

    def __init__(self, config: Mapping[str, Any], image_size: int = 480, tokenizer=None):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(config, image_size, drop_path_rate=0.1)
        self.tokenizer = tokenizer or build_tokenizer(config)
        enc_cfg = med_config(config, self.tokenizer, vision_width)
        self.text_encoder = BertModel(enc_cfg, add_pooling_layer=False)
        # The decoder attends to the question encoder's states, whose width is the text width.
        self.text_decoder = BertLMHeadModel(med_config(config, self.tokenizer, enc_cfg.hidden_size))

    def encode_question(self, image: Tensor, question: list[str]) -> tuple[Tensor, Tensor]:
        """The question encoder's states (B, T', D) and their padding mask (B, T'): T' < T when token hooks
        dropped question tokens, and the answer decoder then reads exactly the tokens that are left."""
        embeds, atts = encode_image(self.visual_encoder, image)
        q = tokenize(
            self.tokenizer,
            question,
            image.device,
            first=self.tokenizer.enc_token_id,
            padding="longest",
            truncation=True,
            max_length=35,
        )
        states, state = self.text_encoder.encode(q.input_ids, q.attention_mask, embeds, atts)
        return states, state.padding_mask(states)

    def _answers(self, answers: list[str], device: torch.device):
        return tokenize(self.tokenizer, answers, device, first=self.tokenizer.bos_token_id, padding="longest")

    def forward(self, image: Tensor, question: list[str], answer: list[str], n: list[int], weights: Tensor) -> Tensor:
        """Training loss: each question's states are repeated once per distinct answer; the per-answer
        summed label-smoothed LM loss is weighted and averaged over questions."""
        states, q_mask = self.encode_question(image, question)
        a = self._answers(answer, image.device)
        targets = lm_targets(self.tokenizer, a.input_ids)
        counts = torch.as_tensor(n, device=image.device)
        states = states.repeat_interleave(counts, dim=0)
        q_mask = q_mask.repeat_interleave(counts, dim=0)
        loss = self.text_decoder(a.input_ids, a.attention_mask, states, q_mask, labels=targets, reduction="none").loss
        return (weights.to(loss.device) * loss).sum() / image.shape[0]

    @torch.no_grad()
    def rank_answers(
        self, image: Tensor, question: list[str], answer_list: list[str], k: int = 128, answer_ids=None
    ) -> list[int]:
        """Index into ``answer_list`` of the best answer per question: the first-token probability picks
        ``k`` candidates, which are then scored by minus their summed label-smoothed LM loss."""
        states, q_mask = self.encode_question(image, question)
        a = answer_ids if answer_ids is not None else self._answers(answer_list, image.device)
        ids, atts = a.input_ids, a.attention_mask
        nq, na = states.shape[0], ids.shape[0]
        k = min(k, na)
        start = ids[0, :1].expand(nq, 1)
        logits0 = self.text_decoder(start, None, states, q_mask).logits[:, 0]
        p_first = F.softmax(logits0.float(), dim=1).index_select(1, ids[:, 1])
        topk_prob, topk_ids = p_first.topk(k, dim=1)

        cand_ids = ids.index_select(0, topk_ids.reshape(-1))
        cand_atts = atts.index_select(0, topk_ids.reshape(-1))
        targets = lm_targets(self.tokenizer, cand_ids)
        states_k = states.repeat_interleave(k, dim=0)
        q_mask_k = q_mask.repeat_interleave(k, dim=0)
        loss = self.text_decoder(cand_ids, cand_atts, states_k, q_mask_k, labels=targets, reduction="none").loss
        best = (-loss).view(nq, k).argmax(dim=1)
        return topk_ids.gather(1, best[:, None]).squeeze(1).tolist()

    @torch.no_grad()
    def generate_answers(
        self, image: Tensor, question: list[str], num_beams: int = 3, max_length: int = 10, min_length: int = 1
    ) -> list[str]:
        states, q_mask = self.encode_question(image, question)
        all_ones = torch.ones_like(states[..., 0], dtype=torch.long)  # BLIP does not mask question padding here
        start = torch.full((states.shape[0], 1), self.tokenizer.bos_token_id, dtype=torch.long, device=image.device)
        out = self.text_decoder.generate(
            start,
            states,
            all_ones,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)
        self.text_decoder.set_grad_checkpointing(enable)
