"""What ViLT's tasks read besides the shared datasets: VQA questions with soft scores over an answer vocabulary,
PuMer's image pipeline, and the collate function that tokenizes text into fixed-length batches.

VQA (spec pumer_vilt.md 6): every question is scored against the answer vocabulary ``vqa2_label2ans.json`` (the
list; ``vqa2_ans2label.json`` is its inverse), each annotator answer that is in the vocabulary counting towards its
label, ``0.3`` per vote capped at 1 (0, 0.3, 0.6, 0.9, 1.0). The questions come in either of the two official
layouts: VQAv2 entries as the BLIP files hold them (``question_id``, ``question``, ``answer`` (the ten annotator
answers), ``image``) or PuMer's jsonl (``qid``, ``question``, ``img_id``, ``label`` {answer: score}); images are
read from a folder (PuMer's LMDB image stores are not read).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from data.utils import AnnotationDataset, Transform, pre_question, read_jsonl

__all__ = [
    "ViltBatch",
    "ViltCollate",
    "ViltVQADataset",
    "load_answer_vocab",
    "soft_score",
    "tokenize",
    "vilt_transform",
]

VOCAB_FILE = "vqa2_label2ans.json"


def soft_score(votes: int) -> float:
    """The score of an answer given by ``votes`` of the ten annotators: 0, 0.3, 0.6, 0.9, then 1."""
    return min(1.0, 0.3 * votes)


def load_answer_vocab(ann_root: str | os.PathLike) -> list[str]:
    """The answer list (``vqa2_label2ans.json``) under ``ann_root``; an error names the file."""
    path = Path(ann_root) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"ViLT's VQA answer vocabulary {path} does not exist; build it from the VQAv2 annotation with "
            "`python -m data.vqa --make-vocab --ann_root DIR`"
        )
    answers = json.loads(path.read_text())
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
        raise ValueError(f"{path} must hold a non-empty JSON list of answer strings")
    if len(set(answers)) != len(answers):
        raise ValueError(f"{path} lists some answers twice")
    return answers


class ViltVQADataset(AnnotationDataset):
    """Items are ``(image, question, scores (num_labels,), question_id)``; ``scores`` is all zeros for a question
    without answers (the official test split), and ``answers`` (question_id -> annotator answers) is ``None`` then.

    ``files`` are annotation names under ``ann_root`` (``vqa_train`` reads ``vqa_train.json`` or, failing that,
    ``vqa_train.jsonl`` in PuMer's layout); images are ``vqa_root / image`` (BLIP layout) or
    ``vqa_root / <split folder> / <img_id>.jpg`` (PuMer's ``COCO_<split>_<id>`` names).
    """

    def __init__(
        self,
        transform: Transform | None,
        ann_root: str | os.PathLike,
        vqa_root: str | os.PathLike,
        files: Sequence[str],
        answers: Sequence[str],
        max_words: int = 50,
    ) -> None:
        super().__init__(transform)
        self.vqa_root = vqa_root
        self.max_words = max_words
        self.answer_list = list(answers)
        self.label_of = {a: i for i, a in enumerate(self.answer_list)}
        if isinstance(files, str):
            files = [files]
        for name in files:
            jsonl = Path(ann_root) / f"{name}.jsonl"
            if not (Path(ann_root) / f"{name}.json").is_file() and jsonl.is_file():
                self._add_entries([entry for _, entry in read_jsonl(jsonl)], jsonl)
            else:
                self._add_annotation(ann_root, f"{name}.json")
        known = {self._qid(e): e["answer"] for e in self.annotation if "answer" in e}
        self.answers: dict[int, Any] | None = known or None

    @staticmethod
    def _qid(entry: dict) -> int:
        return int(entry["question_id"] if "question_id" in entry else entry["qid"])

    def scores(self, entry: dict) -> Tensor:
        """The soft-score target of one entry over the vocabulary."""
        target = torch.zeros(len(self.answer_list))
        if "label" in entry:  # PuMer's jsonl: scores already given
            for answer, score in entry["label"].items():
                if answer in self.label_of:
                    target[self.label_of[answer]] = float(score)
        elif "answer" in entry:
            for answer, votes in Counter(entry["answer"]).items():
                if answer in self.label_of:
                    target[self.label_of[answer]] = soft_score(votes)
        return target

    def _path(self, entry: dict) -> str:
        if "image" in entry:
            return entry["image"]
        img_id = entry["img_id"]  # COCO_<split>_<12 digits>
        return f"{img_id.split('_')[1]}/{img_id}.jpg"

    def __getitem__(self, index: int):
        entry = self.annotation[index]
        image = self._load(self.vqa_root, self._path(entry), index)
        question = pre_question(entry["question"], self.max_words)
        return image, question, self.scores(entry), self._qid(entry)


def vilt_transform(split: str, image_size: int, randaug: bool = True) -> v2.Compose:
    """PuMer's ViLT pipeline (spec pumer_vilt.md 5.5): [train: RandAugment(2, 9)], resize to a square (bilinear),
    normalise with mean = std = 0.5. Every image gives the same patch grid, so no pixel mask is needed."""
    steps: list[Any] = [v2.ToImage()]
    if split == "train" and randaug:
        steps.append(v2.RandAugment(num_ops=2, magnitude=9))
    steps += [
        v2.Resize((image_size, image_size), interpolation=InterpolationMode.BILINEAR),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * 3, [0.5] * 3),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


class ViltBatch(NamedTuple):
    """A ViLT batch: token ids and mask (B, T), images (B, 3, H, W), NLVR2's second images (or None), the targets
    (class ids, or VQA's soft scores) and each example's key (question id, or index)."""

    ids: Tensor
    mask: Tensor
    images: Tensor
    images2: Tensor | None
    target: Tensor
    key: Tensor


def tokenize(tokenizer: Callable, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Token ids and mask (N, max_len) of ``texts``: ``[CLS] ... [SEP]``, padded to and truncated at ``max_len``."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(max_len), return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class ViltCollate:
    """Tokenize the texts of a batch to ``max_len`` tokens (``[CLS] ... [SEP]``, padded, truncated) and stack the
    rest. ``layout`` names the item: ``vqa`` (image, text, scores, qid), ``pair`` (image0, image1, text, label),
    ``single`` (image, text, label)."""

    def __init__(self, tokenizer: Callable, max_len: int, layout: str) -> None:
        if layout not in ("vqa", "pair", "single"):
            raise ValueError(f"unknown ViLT batch layout {layout!r}")
        self.tokenizer, self.max_len, self.layout = tokenizer, int(max_len), layout

    def tokens(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return tokenize(self.tokenizer, texts, self.max_len)

    def __call__(self, items: Sequence[tuple]) -> ViltBatch:
        n = len(items)
        if self.layout == "vqa":
            images, texts, scores, qids = zip(*items)
            ids, mask = self.tokens(texts)
            return ViltBatch(ids, mask, torch.stack(images), None, torch.stack(scores), torch.tensor(qids))
        if self.layout == "pair":
            left, right, texts, labels = zip(*items)
            ids, mask = self.tokens(texts)
            return ViltBatch(ids, mask, torch.stack(left), torch.stack(right), torch.tensor(labels), torch.arange(n))
        images, texts, labels = zip(*items)
        ids, mask = self.tokens(texts)
        return ViltBatch(ids, mask, torch.stack(images), None, torch.tensor(labels), torch.arange(n))
