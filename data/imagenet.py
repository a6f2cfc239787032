"""ImageNet-style classification from ``<root>/train`` and ``<root>/val`` class-folder trees."""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets import ImageFolder

from data.utils import Transform, load_image

SPLIT_DIRS = {"train": "train", "val": "val"}


class ImageNetDataset(ImageFolder):
    """Items are (image, class index); ``classes`` lists the class folder names in index order.

    Images go through ``load_image`` so that a broken file is reported with its class folder and
    position instead of torchvision's bare PIL error.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Transform | None = None) -> None:
        if split not in SPLIT_DIRS:
            raise ValueError(f"unknown ImageNet split {split!r}; expected one of {sorted(SPLIT_DIRS)}")
        folder = Path(root) / SPLIT_DIRS[split]
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet {split} folder not found: {folder} (expected <root>/{split}/<class>/*)")
        super().__init__(os.fspath(folder), transform=transform)
        self.split = split

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        entry = {"image": os.path.relpath(path, self.root), "class": self.classes[target]}
        image = load_image(path, entry, index, self.root)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
