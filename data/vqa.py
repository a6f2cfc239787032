"""VQAv2 (+ Visual Genome QA for training): questions over COCO images, ranked against an answer list."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import torch

from data.utils import AnnotationDataset, Transform, load_annotation, pre_question

TRAIN_FILES = ("vqa_train", "vqa_val", "vg_qa")
VG_ANSWER_WEIGHT = 0.2


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order, each weighted count / len(answers)."""
    counts = Counter(answers)
    return list(counts), [c / len(answers) for c in counts.values()]


class _VQABase(AnnotationDataset):
    def __init__(
        self,
        transform: Transform | None,
        ann_root: str | os.PathLike,
        vqa_root: str | os.PathLike,
        vg_root: str | os.PathLike | None,
    ) -> None:
        super().__init__(transform)
        self.vqa_root = vqa_root
        self.vg_root = vg_root

    def _image(self, index: int):
        ann = self.annotation[index]
        kind = ann.get("dataset")
        if kind == "vqa":
            root = self.vqa_root
        elif kind == "vg" and self.vg_root is not None:
            root = self.vg_root
        else:
            source, local = self._source_of(index)
            wanted = "vg_root is not set" if kind == "vg" else 'expected "vqa" or "vg"'
            raise ValueError(f"entry {local} of {source} has dataset {kind!r} ({wanted}): {ann}")
        return self._load(root, ann["image"], index)


class VQATrainDataset(_VQABase):
    """Items are (image, question, answers, weights) over the concatenated ``train_files``.

    VQA entries carry ~10 annotator answers: each distinct answer is weighted by its share. VG
    entries carry one answer, weighted ``VG_ANSWER_WEIGHT``.
    """

    def __init__(
        self,
        transform: Transform | None,
        ann_root: str | os.PathLike,
        vqa_root: str | os.PathLike,
        vg_root: str | os.PathLike | None,
        train_files: Sequence[str] = TRAIN_FILES,
    ) -> None:
        super().__init__(transform, ann_root, vqa_root, vg_root)
        if isinstance(train_files, str):
            train_files = [train_files]
        for name in train_files:
            self._add_annotation(ann_root, f"{name}.json")

    def __getitem__(self, index: int):
        ann = self.annotation[index]
        image = self._image(index)
        question = pre_question(ann["question"])
        if ann["dataset"] == "vqa":
            answers, weights = answer_weights(ann["answer"])
        else:
            answers, weights = [ann["answer"]], [VG_ANSWER_WEIGHT]
        return image, question, answers, weights


class VQATestDataset(_VQABase):
    """Items are (image, question, question_id).

    ``answer_list`` is the ranking vocabulary. ``answers`` maps question_id to its annotator answers
    when the annotation has them (the official test file has none; then it is None).
    """

    def __init__(
        self,
        transform: Transform | None,
        ann_root: str | os.PathLike,
        vqa_root: str | os.PathLike,
        vg_root: str | os.PathLike | None = None,
        split_file: str = "vqa_test",
    ) -> None:
        super().__init__(transform, ann_root, vqa_root, vg_root)
        self._add_annotation(ann_root, f"{split_file}.json")
        self.answer_list: list[str] = load_annotation(ann_root, "answer_list.json")[0]
        answers = {ann["question_id"]: ann["answer"] for ann in self.annotation if "answer" in ann}
        self.answers: dict[int, list[str]] | None = answers or None

    def __getitem__(self, index: int):
        ann = self.annotation[index]
        return self._image(index), pre_question(ann["question"]), ann["question_id"]


def vqa_collate_fn(batch):
    """(stacked images, questions, flat answers, flat float weights, answers per question)."""
    images, questions, answers, weights, counts = [], [], [], [], []
    for image, question, item_answers, item_weights in batch:
        images.append(image)
        questions.append(question)
        answers.extend(item_answers)
        weights.extend(item_weights)
        counts.append(len(item_answers))
    return torch.stack(images), questions, answers, torch.tensor(weights, dtype=torch.float32), counts
