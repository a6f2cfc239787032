"""SNLI-VE (visual entailment): a Flickr30k image as the premise, a sentence as the hypothesis, and one of
entailment / neutral / contradiction.

The annotation is the official jsonl release: ``snli_ve_{train,dev,test}.jsonl`` with one JSON object a line,
of which ``Flickr30K_ID``, ``sentence2`` (the hypothesis) and ``gold_label`` are read. The premise caption
(``sentence1``) is not: the image is the premise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.utils import AnnotationDataset, ImageLoadError, Transform, load_image, pre_caption, read_jsonl
from utils import log

ANNOTATION_FILES = {
    "train": "snli_ve_train.jsonl",
    "dev": "snli_ve_dev.jsonl",
    "val": "snli_ve_dev.jsonl",
    "test": "snli_ve_test.jsonl",
}
# PuMer's label ids.
VE_LABEL_IDS = {"contradiction": 0, "neutral": 1, "entailment": 2}
NO_CONSENSUS = "-"  # gold_label of pairs whose annotators did not agree (in some releases); skipped
_REQUIRED = ("Flickr30K_ID", "sentence2", "gold_label")


def load_ve_annotation(path: str | os.PathLike) -> tuple[list[dict], list[int], int]:
    """(entries, the line number of each, how many no-consensus lines were skipped) of one jsonl file.

    A missing file, a line that is not a JSON object with the fields read here, or an unknown gold_label is an
    error naming the file and the line; blank lines are ignored.
    """
    path = Path(path)
    entries, lines, skipped = [], [], 0
    for number, entry in read_jsonl(path):
        missing = [key for key in _REQUIRED if key not in entry]
        if missing:
            raise ValueError(f"{path}, line {number}: missing {', '.join(missing)}; it has {sorted(entry)}")
        label = entry["gold_label"]
        if label == NO_CONSENSUS:
            skipped += 1
            continue
        if label not in VE_LABEL_IDS:
            raise ValueError(
                f"{path}, line {number}: unknown gold_label {label!r}; expected one of "
                f"{', '.join(VE_LABEL_IDS)} (or {NO_CONSENSUS!r}, skipped)"
            )
        if not isinstance(entry["sentence2"], str):
            raise ValueError(f"{path}, line {number}: sentence2 must be a string, got {entry['sentence2']!r}")
        image_id = str(entry["Flickr30K_ID"])
        if not image_id.isdigit():
            raise ValueError(f"{path}, line {number}: Flickr30K_ID must be digits, got {entry['Flickr30K_ID']!r}")
        entries.append(entry)
        lines.append(number)
    if not entries:
        raise ValueError(f"annotation file {path} holds no entries with a gold label")
    return entries, lines, skipped


class VEDataset(AnnotationDataset):
    """Items are (image, hypothesis, label) with label 0 contradiction, 1 neutral, 2 entailment.

    ``split`` is train, dev (alias val) or test; images are ``image_root/<Flickr30K_ID>.jpg``. The hypothesis
    goes through ``pre_caption(text, max_words)``. Lines with gold_label "-" are skipped (their count logged).
    """

    def __init__(
        self,
        transform: Transform | None,
        image_root: str | os.PathLike,
        ann_root: str | os.PathLike,
        split: str,
        max_words: int = 40,
    ) -> None:
        if split not in ANNOTATION_FILES:
            raise ValueError(f"unknown SNLI-VE split {split!r}; expected one of {sorted(ANNOTATION_FILES)}")
        super().__init__(transform)
        path = Path(ann_root) / ANNOTATION_FILES[split]
        entries, self.lines, self.skipped = load_ve_annotation(path)
        self._add_entries(entries, path)
        self.image_root = image_root
        self.split = split
        self.max_words = max_words
        if self.skipped:
            log.info("%s: skipped %d pairs without a gold label (gold_label %r)", path, self.skipped, NO_CONSENSUS)

    def label(self, index: int) -> int:
        return VE_LABEL_IDS[self.annotation[index]["gold_label"]]

    def _image(self, index: int) -> Any:
        entry = self.annotation[index]
        path = os.path.join(self.image_root, f"{entry['Flickr30K_ID']}.jpg")
        try:
            image = load_image(path)
        except ImageLoadError as e:
            raise ImageLoadError(
                f"{e}; referenced by line {self.lines[index]} of {self.sources[0]}: {json.dumps(entry)}"
            ) from e
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int):
        hypothesis = pre_caption(self.annotation[index]["sentence2"], self.max_words)
        return self._image(index), hypothesis, self.label(index)
