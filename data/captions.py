"""COCO Karpathy and Flickr30k: captioning and retrieval datasets (one annotation format for both)."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from data.utils import AnnotationDataset, Transform, pre_caption

ANNOTATION_FILES = {
    "coco": {
        "train": "coco_karpathy_train.json",
        "val": "coco_karpathy_val.json",
        "test": "coco_karpathy_test.json",
    },
    "flickr": {
        "train": "flickr30k_train.json",
        "val": "flickr30k_val.json",
        "test": "flickr30k_test.json",
    },
}


def annotation_file(dataset: str, split: str) -> str:
    try:
        return ANNOTATION_FILES[dataset][split]
    except KeyError:
        raise ValueError(
            f"no caption annotation for dataset {dataset!r} split {split!r}; "
            f"datasets: {sorted(ANNOTATION_FILES)}, splits: train, val, test"
        ) from None


def image_id_from_path(path: str) -> int:
    """The integer after the last underscore of the file name: ``val2014/COCO_val2014_000000000042.jpg`` -> 42.

    This is the id the ``coco_gt`` files use; the annotation entries carry none.
    """
    stem = PurePosixPath(path.replace("\\", "/")).stem
    tail = stem.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"cannot parse an integer image id from file name {path!r}")
    return int(tail)


class CaptionTrainDataset(AnnotationDataset):
    """One item per caption: (image, prompt + pre_caption(caption, max_words), image index).

    The image index is contiguous, numbered by first appearance of each ``image_id``; retrieval
    training uses it to find all positives of an image in a batch and in the queue.
    """

    def __init__(
        self,
        transform: Transform | None,
        image_root: str | os.PathLike,
        ann_root: str | os.PathLike,
        dataset: str = "coco",
        max_words: int = 30,
        prompt: str = "",
    ) -> None:
        super().__init__(transform)
        self._add_annotation(ann_root, annotation_file(dataset, "train"))
        self.image_root = image_root
        self.max_words = max_words
        self.prompt = prompt
        self.img_ids: dict[str, int] = {}
        for ann in self.annotation:
            self.img_ids.setdefault(ann["image_id"], len(self.img_ids))

    def __getitem__(self, index: int):
        ann = self.annotation[index]
        image = self._load(self.image_root, ann["image"], index)
        caption = self.prompt + pre_caption(ann["caption"], self.max_words)
        return image, caption, self.img_ids[ann["image_id"]]


class CaptionEvalDataset(AnnotationDataset):
    """One item per image: (image, integer image id parsed from the file name)."""

    def __init__(
        self,
        transform: Transform | None,
        image_root: str | os.PathLike,
        ann_root: str | os.PathLike,
        split: str,
        dataset: str = "coco",
    ) -> None:
        super().__init__(transform)
        self._add_annotation(ann_root, annotation_file(dataset, split))
        self.image_root = image_root
        # parsed up front so that a malformed name fails at construction, not mid-evaluation
        self.image_ids = [image_id_from_path(ann["image"]) for ann in self.annotation]

    def __getitem__(self, index: int):
        image = self._load(self.image_root, self.annotation[index]["image"], index)
        return image, self.image_ids[index]


class RetrievalEvalDataset(AnnotationDataset):
    """One item per image: (image, index). Texts and ground truth are attributes.

    ``text``: every caption after ``pre_caption``, images in file order, captions in entry order;
    ``image``: relative image paths; ``img2txt[i]``: text indices of image i; ``txt2img[j]``: the
    image of text j.
    """

    def __init__(
        self,
        transform: Transform | None,
        image_root: str | os.PathLike,
        ann_root: str | os.PathLike,
        split: str,
        dataset: str = "coco",
        max_words: int = 30,
    ) -> None:
        super().__init__(transform)
        self._add_annotation(ann_root, annotation_file(dataset, split))
        self.image_root = image_root
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_id, ann in enumerate(self.annotation):
            if not isinstance(ann["caption"], list):
                raise TypeError(
                    f"entry {img_id} of {self.sources[0]} has a single caption; evaluation splits hold a "
                    f"list of captions per image (did you pass a train file?): {ann}"
                )
            self.image.append(ann["image"])
            self.img2txt[img_id] = []
            for caption in ann["caption"]:
                self.txt2img[len(self.text)] = img_id
                self.img2txt[img_id].append(len(self.text))
                self.text.append(pre_caption(caption, max_words))

    def __getitem__(self, index: int):
        return self._load(self.image_root, self.annotation[index]["image"], index), index
