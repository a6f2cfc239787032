"""VQAv2: answer ranking (or generation) over the answer list; the server's result file, plus local VQA
accuracy when the test annotation carries answers (the synthetic world's does)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import utils
from data import create_dataset, vqa_collate_fn
from models.blip import BLIP_DEFAULTS
from models.blip_vqa import BlipVQA
from tasks.common import DATA_DEFAULTS, blip_loader, build_loaders, model_device
from tasks.metrics import collect_results, vqa_score

SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    **BLIP_DEFAULTS,
    "vqa_root": "",
    "vg_root": "",
    "train_files": ["vqa_train", "vqa_val", "vg_qa"],
    "image_size": 480,
    "batch_size_train": 32,
    "batch_size_test": 64,
    "k_test": 128,
    "inference": "rank",  # rank | generate
}


def build_data(config: dict, dist: utils.DistInfo):
    train, test = create_dataset("vqa", config)
    return build_loaders(config, dist, train, {"test": test}, collate_fn=vqa_collate_fn)


def build_model(config: Mapping) -> BlipVQA:
    return BlipVQA(config, image_size=config["image_size"])


class VQATask:
    name = "vqa"
    main_metric = "vqa_acc"

    def __init__(self, config: Mapping):
        if config["inference"] not in ("rank", "generate"):
            raise ValueError(f"inference must be 'rank' or 'generate', got {config['inference']!r}")
        self.config = config
        # Per-sample result files: <output_dir>/result, or a folder of an evaluation's own (set by the entry script).
        self.result_dir = Path(config.get("_result_dir") or Path(config["_output_dir"]) / "result")

    def train_step(self, model, batch, info) -> dict[str, torch.Tensor]:
        image, question, answer, weights, n = batch
        return {
            "loss": model(image.to(model_device(model), non_blocking=True), list(question), list(answer), n, weights)
        }

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, float]:
        device = model_device(model)
        dataset = loader.dataset
        answer_list = dataset.answer_list
        answer_ids = None
        results = []
        for image, question, qid in utils.progress(loader, desc=f"vqa {split}"):
            image = image.to(device)
            if self.config["inference"] == "rank":
                if answer_ids is None:  # tokenised once per evaluation
                    answer_ids = model._answers(answer_list, device)
                best = model.rank_answers(image, list(question), answer_list, self.config["k_test"], answer_ids)
                answers = [answer_list[i] for i in best]
            else:
                answers = model.generate_answers(image, list(question))
            results += [{"question_id": int(q), "answer": a} for q, a in zip(qid, answers)]
        merged = collect_results(results, self.result_dir, "vqa_result", dedup_key="question_id")
        if dataset.answers is None:  # the official test split: the result file is for the evaluation server
            return {"n": len(merged)}
        return vqa_score(merged, dataset.answers)


def build_task(config: Mapping, train_loader) -> VQATask:
    return VQATask(config)


load_pretrained = blip_loader("vqa")
