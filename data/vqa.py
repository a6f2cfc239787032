"""VQAv2 (+ Visual Genome QA for training): questions over COCO images, ranked against an answer list.

Also builds ViLT's classifier vocabulary (``vqa2_ans2label.json`` / ``vqa2_label2ans.json``) from the
annotation::

    python -m data.vqa --make-vocab --ann_root DIR [--files vqa_train vqa_val] [--min_count 9] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from data.utils import AnnotationDataset, Transform, load_annotation, pre_question
from tasks.metrics import normalize_vqa_answer

TRAIN_FILES = ("vqa_train", "vqa_val", "vg_qa")
VG_ANSWER_WEIGHT = 0.2
VOCAB_FILES = ("vqa_train", "vqa_val")  # ViLT's answer vocabulary counts train + val questions
ANS2LABEL_FILE = "vqa2_ans2label.json"
LABEL2ANS_FILE = "vqa2_label2ans.json"


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


def majority_answer(answers: Sequence[str], normalize: bool = True) -> str:
    """The most frequent of one question's annotator answers after :func:`normalize_vqa_answer` (VQAv2's
    "multiple_choice_answer", normalised; ``normalize=False``: as written); a tie goes to the answer seen first."""
    counts = Counter(normalize_vqa_answer(a) if normalize else a for a in answers)
    return max(counts, key=counts.__getitem__)  # max keeps the first of equal counts: first seen


def build_answer_vocab(
    annotation_entries: Iterable[Mapping[str, Any]], min_count: int = 9, normalize: bool = True
) -> list[str]:
    """ViLT's VQA answer vocabulary: every normalised answer that is the majority answer
    (:func:`majority_answer`) of at least ``min_count`` questions, by descending count, ties alphabetical.

    Entries are in the annotation format read here: ``"answer"`` is the list of annotator answers (a single
    string, as in Visual Genome QA, counts as one answer). Answers are normalised as the VQA evaluation does,
    so number words become digits ("two" -> "2"), articles go ("a dog" -> "dog"). PuMer's soft scores count the
    annotator answers as written against these labels (VQAv2's annotators mostly write digits); with
    ``normalize=False`` the labels are the answers as written.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    for index, entry in enumerate(annotation_entries):
        answers = entry.get("answer")
        if isinstance(answers, str):
            answers = [answers]
        if not answers:
            raise ValueError(f"annotation entry {index} has no answers: {entry}")
        counts[majority_answer(answers, normalize)] += 1
    kept = [answer for answer, count in counts.items() if count >= min_count]
    return sorted(kept, key=lambda answer: (-counts[answer], answer))


def answer_vocab_files(vocab: Sequence[str]) -> dict[str, Any]:
    """The two files of a vocabulary, by name: ``vqa2_ans2label.json`` (answer -> index) and
    ``vqa2_label2ans.json`` (the list)."""
    return {ANS2LABEL_FILE: {answer: i for i, answer in enumerate(vocab)}, LABEL2ANS_FILE: list(vocab)}


def make_answer_vocab(
    ann_root: str | os.PathLike,
    files: Sequence[str] = VOCAB_FILES,
    min_count: int = 9,
    out: str | os.PathLike | None = None,
) -> list[str]:
    """Build the vocabulary from ``ann_root/<file>.json`` for each of ``files`` and write its two files to
    ``out`` (default: ``ann_root``)."""
    entries: list = []
    for name in files:
        entries += load_annotation(ann_root, name if name.endswith(".json") else f"{name}.json")[0]
    vocab = build_answer_vocab(entries, min_count)
    out_dir = Path(ann_root if out is None else out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in answer_vocab_files(vocab).items():
        (out_dir / name).write_text(json.dumps(data) + "\n")
    return vocab


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m data.vqa",
        description=f"Write ViLT's VQA answer vocabulary ({ANS2LABEL_FILE}, {LABEL2ANS_FILE}): the normalised "
        "majority answers of at least --min_count questions of the given annotation files.",
    )
    parser.add_argument("--make-vocab", action="store_true", required=True, help="build the answer vocabulary")
    parser.add_argument("--ann_root", required=True, type=Path, help="directory holding the annotation files")
    parser.add_argument(
        "--files", nargs="+", default=list(VOCAB_FILES), help="annotation files, without .json (default: %(default)s)"
    )
    parser.add_argument("--min_count", type=int, default=9, help="questions an answer needs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the two files (default: --ann_root)")
    args = parser.parse_args(argv)
    try:
        vocab = make_answer_vocab(args.ann_root, args.files, args.min_count, args.out)
    except (OSError, ValueError, TypeError) as e:
        parser.error(str(e))
    print(f"{len(vocab)} answers -> {args.out or args.ann_root}")
    return vocab


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


if __name__ == "__main__":
    main()
