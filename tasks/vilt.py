"""ViLT's tasks (VQAv2, NLVR2, SNLI-VE): one classifier head on the pooled text [CLS], trained and evaluated alike.

The thin task modules (``tasks.vilt_vqa``, ``tasks.vilt_nlvr``, ``tasks.vilt_ve``) bind :func:`make` to one task;
everything else is here: the config schema, the loaders (PuMer's image pipeline, the tokenizer of the BERT-style
vocabulary at ``tokenizer``), the model, the loading policy of every released ViLT layout, and the task object
(losses, the logits a teacher distils, accuracy with its 95 % interval).

Losses (spec pumer_vilt.md 4): VQA is BCE-with-logits over the answer vocabulary against the soft scores, averaged
over every logit (PuMer; ``vqa_bce_scale: labels`` multiplies it by the vocabulary size as original ViLT does); NLVR2
and VE are cross-entropy over 2 and 3 classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data.vilt import ViltBatch, ViltCollate, ViltVQADataset, load_answer_vocab, vilt_transform
from models.vilt import VILT_DEFAULTS, ViLT, build_vilt
from tasks.common import DATA_DEFAULTS, build_loaders, model_device
from tasks.metrics import collect_results, vqa_score, wilson_interval

__all__ = ["SCHEMAS", "VILT_SCHEMA", "ViltTask", "make", "vilt_tokenizer"]

# Keys every ViLT task accepts (data, model, tokenizer); each task adds its own.
VILT_SCHEMA: dict[str, Any] = {
    **DATA_DEFAULTS,
    **VILT_DEFAULTS,
    "image_size": 384,
    "tokenizer": "pretrained/bert-base-uncased",
    "randaug": True,
    "batch_size_train": 32,
    "batch_size_test": 64,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "vqa": {
        **VILT_SCHEMA,
        "max_text_len": 32,  # PuMer's VQA
        "vqa_root": "",
        "train_files": ["vqa_train"],  # PuMer trains on train2014 only and selects on val2014
        "val_files": ["vqa_val"],
        "test_files": ["vqa_test"],
        "vqa_bce_scale": "mean",  # mean (PuMer) | labels (original ViLT: x the vocabulary size)
        "vqa_labels": 0,  # answers of the head; 0: as many as the vocabulary file (ann_root/vqa2_label2ans.json)
    },
    "nlvr": {**VILT_SCHEMA, "nlvr_eval_swap": True},
    "ve": {**VILT_SCHEMA},
}
_HEADS = {"vqa": "vqa", "nlvr": "nlvr2", "ve": "ve"}


def vilt_tokenizer(config: Mapping):
    """The BERT-style tokenizer at ``config["tokenizer"]``, checked against the model's vocabulary size."""
    from transformers import BertTokenizer

    path = config["tokenizer"]
    if not Path(path, "vocab.txt").is_file():
        raise FileNotFoundError(f"tokenizer: {path} has no vocab.txt (a bert-base-uncased style folder is needed)")
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) > config["vilt_vocab_size"]:
        raise ValueError(
            f"tokenizer {path} has {len(tokenizer)} tokens but vilt_vocab_size is {config['vilt_vocab_size']}"
        )
    return tokenizer


def _datasets(task: str, config: Mapping) -> tuple[Any, dict[str, Any]]:
    from data import create_dataset

    size, randaug = int(config["image_size"]), bool(config["randaug"])
    train_tf, test_tf = vilt_transform("train", size, randaug), vilt_transform("test", size)
    if task == "vqa":
        answers = load_answer_vocab(config["ann_root"])
        make = lambda files, tf: ViltVQADataset(tf, config["ann_root"], config["vqa_root"], files, answers)  # noqa: E731
        evals = {"val": make(config["val_files"], test_tf)}
        if config["test_files"]:
            evals["test"] = make(config["test_files"], test_tf)
        return make(config["train_files"], train_tf), evals
    splits = create_dataset("nlvr" if task == "nlvr" else "ve", {**config, "nlvr_group_pairs": False})
    for ds, tf in zip(splits, (train_tf, test_tf, test_tf)):
        ds.transform = tf
    return splits[0], {"val": splits[1], "test": splits[2]}


def make(task: str) -> SimpleNamespace:
    """The registry API (SCHEMA, build_data, build_model, build_task, load_pretrained) of the ViLT ``task``."""
    head = _HEADS[task]
    layout = {"vqa": "vqa", "nlvr": "pair", "ve": "single"}[task]

    def build_data(config: dict, dist: utils.DistInfo):
        tokenizer = vilt_tokenizer(config)
        train, evals = _datasets(task, config)
        collate = ViltCollate(tokenizer, config["max_text_len"], layout)
        return build_loaders(config, dist, train, evals, collate_fn=collate, eval_collate_fn=collate)

    def build_model(config: Mapping) -> ViLT:
        labels = 0
        if task == "vqa":
            labels = config["vqa_labels"] or len(load_answer_vocab(config["ann_root"]))
        return build_vilt(config, head, labels)

    def build_task(config: Mapping, train_loader) -> ViltTask:
        return ViltTask(task, config)

    return SimpleNamespace(
        SCHEMA=SCHEMAS[task],
        build_data=build_data,
        build_model=build_model,
        build_task=build_task,
        load_pretrained=load_pretrained,
    )


def load_pretrained(model: ViLT, path: str, config: Mapping, evaluate: bool = False) -> None:
    """Any ViLT weights (original ``.ckpt``, PuMer or Hugging Face folder, our files) under the policy of
    :func:`models.vilt_checkpoints.load_vilt_checkpoint`; a file's reducers (our description, or a PuMer
    ``config.json``) are attached."""
    from models.arch import fit_to_checkpoint
    from models.vilt_checkpoints import load_vilt_checkpoint, read_vilt_weights

    sd, arch, facts = read_vilt_weights(path, model.head)
    if facts["layout"] == "pumer" and model.masked_softmax != "pumer":
        utils.log.info("%s: a PuMer model; its masked softmax replaces the config's %s", path, model.masked_softmax)
        model.masked_softmax = "pumer"
    fit_to_checkpoint(model, sd, arch, str(path), infer=config.get("infer_arch", False))
    load_vilt_checkpoint(model, sd, str(path), evaluate=evaluate)


def _run(model: ViLT, batch: ViltBatch) -> torch.Tensor:
    device = model_device(model)
    images2 = None if batch.images2 is None else batch.images2.to(device, non_blocking=True)
    return model(batch.ids.to(device), batch.mask.to(device), batch.images.to(device, non_blocking=True), images2)


class ViltTask:
    """Train step (task loss, and the logits for a teacher) and evaluation of one ViLT task."""

    def __init__(self, task: str, config: Mapping):
        self.name = task
        self.main_metric = "vqa_acc" if task == "vqa" else "acc"
        self.config = config
        if task == "vqa" and config["vqa_bce_scale"] not in ("mean", "labels"):
            raise ValueError(f"vqa_bce_scale must be 'mean' or 'labels', got {config['vqa_bce_scale']!r}")
        self.result_dir = Path(config.get("_result_dir") or Path(config["_output_dir"]) / "result")

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.device)
        if self.name == "vqa":
            loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
            return loss * logits.shape[1] if self.config["vqa_bce_scale"] == "labels" else loss
        return F.cross_entropy(logits.float(), target)

    def train_step(self, model, batch: ViltBatch, info) -> dict[str, torch.Tensor]:
        logits = _run(model, batch)
        return {"loss": self.loss(logits, batch.target), "logits": logits}

    def teacher_logits(self, teacher, batch: ViltBatch) -> torch.Tensor:
        return _run(teacher, batch)

    @torch.no_grad()
    def evaluate(self, model, loader, split: str) -> dict[str, Any]:
        if self.name == "vqa":
            return self._evaluate_vqa(model, loader, split)
        correct = total = 0.0
        for batch in utils.progress(loader, desc=f"{self.name} {split}"):
            hits = (_run(model, batch).argmax(1).cpu() == batch.target).tolist()
            correct, total = correct + sum(hits), total + len(hits)
        c, n = utils.all_reduce_sum([correct, total])
        return {"acc": 100.0 * c / max(n, 1), "acc_ci95": wilson_interval(c, n), "n": int(n)}

    def _evaluate_vqa(self, model, loader, split: str) -> dict[str, Any]:
        """The answer of the highest logit per question: the result file for EvalAI (``[{question_id, answer}]``),
        PuMer's local score (the soft score of that answer, ``vqa_score``) and, where annotator answers are known,
        the official VQA accuracy (``vqa_acc``), each with a 95 % interval."""
        dataset = loader.dataset
        results, scores = [], []
        for batch in utils.progress(loader, desc=f"vqa {split}"):
            best = _run(model, batch).argmax(1).cpu()
            scores += batch.target.gather(1, best[:, None])[:, 0].tolist()
            results += [{"question_id": int(q), "answer": dataset.answer_list[int(i)]} for q, i in zip(batch.key, best)]
        merged = collect_results(results, self.result_dir, f"vqa_{split}_result", dedup_key="question_id")
        s, s2, n = utils.all_reduce_sum([sum(scores), sum(x * x for x in scores), len(scores)])
        out: dict[str, Any] = {"n": len(merged), "vqa_score": 100.0 * s / max(n, 1)}
        out["vqa_score_ci95"] = _mean_interval(s, s2, n)
        if dataset.answers is not None:
            out |= vqa_score(merged, dataset.answers)
            out["vqa_acc_ci95"] = _acc_interval(merged, dataset.answers, out["vqa_acc"])
        return out


def _mean_interval(total: float, squares: float, n: float) -> list[float]:
    """95 % normal interval (percent) of a mean of values in [0, 1] from their sum and sum of squares."""
    if n <= 1:
        return [0.0, 100.0]
    mean = total / n
    sd = math.sqrt(max(squares / n - mean * mean, 0.0) * n / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return [100.0 * max(0.0, mean - half), 100.0 * min(1.0, mean + half)]


def _acc_interval(results, answers, acc: float) -> list[float]:
    """95 % interval of the VQA accuracy: the official per-question accuracies' spread."""
    from tasks.metrics import vqa_accuracy

    values = [vqa_accuracy(r["answer"], answers[r["question_id"]]) for r in results]
    return _mean_interval(sum(values), sum(v * v for v in values), len(values))
