"""NLVR2: two images, one statement, a true/false label."""

from __future__ import annotations

import hashlib
import os
import random

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

    def __getitem__(self, index: int):
        ann = self.annotation[index]
        path0, path1 = ann["images"]
        image0 = self._load(self.image_root, path0, index)
        image1 = self._load(self.image_root, path1, index)
        sentence = pre_caption(ann["sentence"], self.max_words)
        if ann["label"] not in ("True", "False"):
            source, local = self._source_of(index)
            raise ValueError(f'entry {local} of {source} has label {ann["label"]!r}; expected "True" or "False"')
        label = int(ann["label"] == "True")
        if self._swap(index):
            return image1, image0, swap_left_right(sentence), label
        return image0, image1, sentence, label


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
