"""NLVR2: two images, one statement, a true/false label."""

from __future__ import annotations

import hashlib
import os
import random
from typing import NamedTuple

import torch
from torch import Tensor

from data.utils import AnnotationDataset, Transform, pre_caption

ANNOTATION_FILES = {
    "train": "nlvr_train.json",
    "val": "nlvr_dev.json",
    "dev": "nlvr_dev.json",
    "test": "nlvr_test.json",
}
_MIRROR = {"left": "right", "right": "left"}


def eval_swap_decision(seed: int, index: int) -> bool:
    """A fair coin that depends only on (seed, index), not on the process that asks."""
    digest = hashlib.blake2b(f"nlvr-swap:{seed}:{index}".encode(), digest_size=8).digest()
    return digest[0] & 1 == 1


def swap_left_right(sentence: str) -> str:
    """Exchange the whole words "left" and "right" ("left," is not a whole word, as in BLIP)."""
    return " ".join(_MIRROR.get(word, word) for word in sentence.split(" "))


class NLVRDataset(AnnotationDataset):
    """Items are (image0, image1, sentence, label) with label 1 for "True".

    Half of the items come with the two images exchanged and the words left/right mirrored, so the
    model cannot rely on image order. BLIP does this in every split with Python's ``random``, which
    makes dev/test accuracy depend on the seed, worker count and world size. Here training keeps
    ``random``; evaluation splits decide with ``eval_swap_decision(swap_seed, index)`` instead, so
    every run sees the same pairs. ``eval_swap=False`` turns the evaluation swap off entirely.
    """

    def __init__(
        self,
        transform: Transform | None,
        image_root: str | os.PathLike,
        ann_root: str | os.PathLike,
        split: str,
        eval_swap: bool = True,
        swap_seed: int = 0,
        max_words: int = 40,
    ) -> None:
        if split not in ANNOTATION_FILES:
            raise ValueError(f"unknown NLVR2 split {split!r}; expected one of {sorted(ANNOTATION_FILES)}")
        super().__init__(transform)
        self._add_annotation(ann_root, ANNOTATION_FILES[split])
        self.image_root = image_root
        self.split = split
        self.eval_swap = eval_swap
        self.swap_seed = swap_seed
        self.max_words = max_words

    def _swap(self, index: int) -> bool:
        if self.split == "train":
            return random.random() >= 0.5
        return self.eval_swap and eval_swap_decision(self.swap_seed, index)

    def _statement(self, index: int) -> tuple[str, int, bool]:
        """(sentence as the model reads it, label, whether the two images are exchanged) of entry ``index``."""
        ann = self.annotation[index]
        if ann["label"] not in ("True", "False"):
            source, local = self._source_of(index)
            raise ValueError(f'entry {local} of {source} has label {ann["label"]!r}; expected "True" or "False"')
        sentence = pre_caption(ann["sentence"], self.max_words)
        swapped = self._swap(index)
        return (swap_left_right(sentence) if swapped else sentence), int(ann["label"] == "True"), swapped

    def _pair(self, index: int) -> tuple[str, str]:
        images = self.annotation[index].get("images")
        if not isinstance(images, (list, tuple)) or len(images) != 2:
            source, local = self._source_of(index)
            raise ValueError(f'entry {local} of {source} needs "images": a list of two paths; it has {images!r}')
        return images[0], images[1]

    def __getitem__(self, index: int):
        path0, path1 = self._pair(index)
        image0 = self._load(self.image_root, path0, index)
        image1 = self._load(self.image_root, path1, index)
        sentence, label, swapped = self._statement(index)
        return (image1, image0, sentence, label) if swapped else (image0, image1, sentence, label)


class NLVRPairBatch(NamedTuple):
    """A batch of statements that share image pairs: each pair's two images are encoded once.

    ``images`` holds both images of every pair in the batch, pair by pair ((2P, C, H, W)); row ``s`` of
    ``pairs`` ((S, 2), long) gives the rows of ``images`` that statement ``s`` reads as its first and its
    second image (already exchanged for a swapped statement, whose left/right words are mirrored too).
    """

    images: Tensor
    pairs: Tensor
    text: list[str]
    targets: Tensor


class NLVRPairDataset(NLVRDataset):
    """NLVR2 with one item per image pair: the pair's two images and all of its statements.

    It reads the same files and makes the same per-statement swap decisions (evaluation: the same coin for the
    same entry), so the statements, labels and what the model is asked are those of :class:`NLVRDataset`; only
    the grouping differs. Where pairs carry several statements (the synthetic world writes four per pair) the
    images are decoded and encoded once per pair instead of once per statement. Batch with
    :func:`collate_pairs`; batch sizes count pairs.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        groups: dict[tuple[str, str], list[int]] = {}
        for index in range(len(self.annotation)):
            groups.setdefault(self._pair(index), []).append(index)
        self.groups = list(groups.items())  # ((path0, path1), entry indices), in order of first appearance

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def num_statements(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int):
        (path0, path1), entries = self.groups[index]
        image0 = self._load(self.image_root, path0, entries[0])
        image1 = self._load(self.image_root, path1, entries[0])
        return image0, image1, [self._statement(i) for i in entries]


def collate_pairs(batch: list) -> NLVRPairBatch:
    """Collate :class:`NLVRPairDataset` items into an :class:`NLVRPairBatch`."""
    images, pairs, text, targets = [], [], [], []
    for p, (image0, image1, statements) in enumerate(batch):
        images += [image0, image1]
        for sentence, label, swapped in statements:
            pairs.append((2 * p + 1, 2 * p) if swapped else (2 * p, 2 * p + 1))
            text.append(sentence)
            targets.append(label)
    return NLVRPairBatch(torch.stack(images), torch.tensor(pairs, dtype=torch.long), text, torch.tensor(targets))


TA_CLASSES = ("first", "second", "neither")


class TextAssignmentDataset(AnnotationDataset):
    """ALBEF's text assignment (TA): two-image pre-training for the NLVR2 model, made from captions.

    Item ``i`` is the ``i``-th caption of the annotation (entries ``{"image", "caption"}`` with one caption
    or a list of them, as in the COCO Karpathy and Flickr30k files) with two images and a label: 0 when
    the caption describes the first image, 1 the second, 2 neither (both images are other ones). Training
    draws the label and the other images with Python's ``random``, afresh each epoch; evaluation draws them
    from a generator seeded by (``seed``, ``i``), so every run and every world size scores the same items.
    """

    def __init__(
        self,
        transform: Transform | None,
        image_root: str | os.PathLike,
        ann_root: str | os.PathLike,
        files: list[str],
        train: bool,
        seed: int = 0,
        max_words: int = 30,
    ) -> None:
        super().__init__(transform)
        for name in files:
            self._add_annotation(ann_root, name)
        self.image_root = image_root
        self.train = train
        self.seed = seed
        self.max_words = max_words
        self.items: list[tuple[int, str]] = []  # (entry index, caption)
        first_entry: dict[str, int] = {}
        for index, entry in enumerate(self.annotation):
            if "image" not in entry or "caption" not in entry:
                source, local = self._source_of(index)
                raise ValueError(f'entry {local} of {source} needs "image" and "caption" keys; it has {sorted(entry)}')
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            self.items.extend((index, c) for c in captions)
            first_entry.setdefault(entry["image"], index)
        self.images = sorted(first_entry)
        self._entry_of_image = [first_entry[p] for p in self.images]
        self._image_index = {p: i for i, p in enumerate(self.images)}
        if len(self.images) < 3:
            raise ValueError(
                f"text assignment needs at least 3 distinct images; {files} under {ann_root} have {len(self.images)}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def assignment(self, index: int) -> tuple[int, int, int]:
        """(first image, second image, label) of item ``index``, images as indices into ``self.images``."""
        rng = random if self.train else random.Random(f"text-assignment:{self.seed}:{index}")
        own = self._image_index[self.annotation[self.items[index][0]]["image"]]
        label = rng.randrange(len(TA_CLASSES))
        a, b = (i if i < own else i + 1 for i in rng.sample(range(len(self.images) - 1), 2))
        return {0: (own, a, 0), 1: (a, own, 1), 2: (a, b, 2)}[label]

    def __getitem__(self, index: int):
        first, second, label = self.assignment(index)
        images = [self._load(self.image_root, self.images[i], self._entry_of_image[i]) for i in (first, second)]
        return images[0], images[1], pre_caption(self.items[index][1], self.max_words), label
