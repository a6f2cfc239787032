"""Datasets for every task, their transforms, and the distributed samplers and loaders around them."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from data.captions import CaptionEvalDataset, CaptionTrainDataset, RetrievalEvalDataset, image_id_from_path
from data.imagenet import ImageNetDataset
from data.nlvr import NLVRDataset, NLVRPairDataset, TextAssignmentDataset
from data.transforms import RandomAugment, build_imagenet_transform, build_transform
from data.utils import ImageLoadError, load_image, pre_caption, pre_question
from data.ve import VEDataset
from data.vqa import TRAIN_FILES, VQATestDataset, VQATrainDataset, vqa_collate_fn

__all__ = [
    "DATASETS",
    "CaptionEvalDataset",
    "CaptionTrainDataset",
    "ImageLoadError",
    "ImageNetDataset",
    "NLVRDataset",
    "TextAssignmentDataset",
    "VEDataset",
    "RandomAugment",
    "RetrievalEvalDataset",
    "VQATestDataset",
    "VQATrainDataset",
    "build_imagenet_transform",
    "build_transform",
    "create_dataset",
    "create_loader",
    "create_sampler",
    "image_id_from_path",
    "load_image",
    "pre_caption",
    "pre_question",
    "vqa_collate_fn",
]

DATASETS = (
    "nlvr",
    "text_assignment",
    "caption_coco",
    "retrieval_coco",
    "retrieval_flickr",
    "vqa",
    "imagenet",
    "ve",
)


def _require(config: Mapping, key: str, name: str) -> Any:
    if config.get(key) is None:
        raise KeyError(f"create_dataset({name!r}) needs config key {key!r}")
    return config[key]


def create_dataset(name: str, config: Mapping) -> tuple[Dataset, ...]:
    """Build the splits of one task: (train, val, test); VQA gives (train, test), ImageNet and text
    assignment (train, val), SNLI-VE ("ve") (train, dev, test).

    ``name`` is one of ``DATASETS``, or "retrieval" with ``config["dataset"]`` in {coco, flickr}.
    Reads ``image_root``, ``ann_root``, ``image_size``, and per task ``prompt`` (captioning),
    ``vqa_root``/``vg_root``/``train_files`` (VQA), ``nlvr_eval_swap``, ``nlvr_group_pairs`` and ``seed`` (NLVR2),
    ``ta_train_files``/``ta_val_files`` and ``seed`` (text assignment), plus
    the transform switches of ``build_transform`` (or ``build_imagenet_transform``).
    """
    if name == "retrieval":
        name = f"retrieval_{_require(config, 'dataset', name)}"
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    size = int(_require(config, "image_size", name))

    if name == "imagenet":
        root = _require(config, "image_root", name)
        return (
            ImageNetDataset(root, "train", build_imagenet_transform("train", size, config)),
            ImageNetDataset(root, "val", build_imagenet_transform("val", size, config)),
        )

    train_tf = build_transform("train", size, config)
    test_tf = build_transform("test", size, config)
    ann_root = _require(config, "ann_root", name)

    if name == "vqa":
        vqa_root = _require(config, "vqa_root", name)
        vg_root = config.get("vg_root")
        train_files = config.get("train_files") or TRAIN_FILES
        return (
            VQATrainDataset(train_tf, ann_root, vqa_root, vg_root, train_files),
            VQATestDataset(test_tf, ann_root, vqa_root, vg_root),
        )

    image_root = _require(config, "image_root", name)
    if name == "nlvr":
        swap = bool(config.get("nlvr_eval_swap", True))
        seed = int(config.get("seed") or 0)
        cls = NLVRPairDataset if config.get("nlvr_group_pairs") else NLVRDataset
        return tuple(
            cls(tf, image_root, ann_root, split, eval_swap=swap, swap_seed=seed)
            for tf, split in ((train_tf, "train"), (test_tf, "val"), (test_tf, "test"))
        )
    if name == "ve":
        return tuple(
            VEDataset(tf, image_root, ann_root, split)
            for tf, split in ((train_tf, "train"), (test_tf, "dev"), (test_tf, "test"))
        )
    if name == "text_assignment":
        seed = int(config.get("seed") or 0)
        return (
            TextAssignmentDataset(train_tf, image_root, ann_root, list(_require(config, "ta_train_files", name)), True),
            TextAssignmentDataset(
                test_tf, image_root, ann_root, list(_require(config, "ta_val_files", name)), False, seed
            ),
        )
    if name == "caption_coco":
        return (
            CaptionTrainDataset(train_tf, image_root, ann_root, "coco", prompt=config.get("prompt") or ""),
            CaptionEvalDataset(test_tf, image_root, ann_root, "val", "coco"),
            CaptionEvalDataset(test_tf, image_root, ann_root, "test", "coco"),
        )
    family = name.removeprefix("retrieval_")
    return (
        CaptionTrainDataset(train_tf, image_root, ann_root, family),
        RetrievalEvalDataset(test_tf, image_root, ann_root, "val", family),
        RetrievalEvalDataset(test_tf, image_root, ann_root, "test", family),
    )


def create_sampler(
    datasets: Sequence[Dataset], shuffles: Sequence[bool], num_tasks: int, global_rank: int, seed: int = 0
) -> list[DistributedSampler]:
    """One ``DistributedSampler`` per dataset; call ``set_epoch`` on the train one every epoch.

    Evaluation samplers pad the last shard with repeated samples, so results must be de-duplicated
    (captions by image id, VQA by question id) before scoring.
    """
    return [
        DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=shuffle, seed=seed)
        for dataset, shuffle in zip(datasets, shuffles, strict=True)
    ]


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker initial_seed = base_seed + worker_id; derive Python's and NumPy's
    # streams from it explicitly, so the result does not depend on torch's own (disableable)
    # NumPy reseeding.
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))


class _ForkParitySeeding:
    """Give every worker the NumPy state the parent had when the loader was built.

    This is what the UPop/MADTP forks get by disabling torch's per-worker NumPy reseeding: all
    workers (and, without persistent workers, all epochs) replay the same NumPy draws, hence the same
    RandomAugment choices. Python's ``random`` and torch stay per-worker, as they do there.
    """

    def __init__(self) -> None:
        self.state = np.random.get_state()

    def __call__(self, worker_id: int) -> None:
        np.random.set_state(self.state)


def create_loader(
    datasets: Sequence[Dataset],
    samplers: Sequence[Sampler | None],
    batch_size: Sequence[int],
    num_workers: Sequence[int],
    is_trains: Sequence[bool],
    collate_fns: Sequence[Callable | None],
    seed: int | None = 0,
    *,
    fork_parity_seeding: bool = False,
    rank: int | None = None,
) -> list[DataLoader]:
    """One ``DataLoader`` per dataset.

    Train loaders drop the last incomplete batch and shuffle only when no sampler does; evaluation
    loaders keep every sample in order. Memory is pinned only when CUDA is available; workers
    persist across epochs when there are any.

    Worker seeds derive from (``seed``, ``rank``, loader position), so augmentation is reproducible
    and differs between ranks (``rank`` defaults to the distributed rank, 0 when not distributed).
    ``seed=None`` draws the base seed from torch's global generator, as plain PyTorch does.
    ``fork_parity_seeding`` reproduces the forks' un-reseeded NumPy in workers (config key of the
    same name).
    """
    if rank is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
    loaders = []
    for position, (dataset, sampler, bs, workers, is_train, collate_fn) in enumerate(
        zip(datasets, samplers, batch_size, num_workers, is_trains, collate_fns, strict=True)
    ):
        generator = None
        if seed is not None:
            entropy = np.random.SeedSequence([seed, rank, position]).generate_state(2, np.uint32)
            generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        loaders.append(
            DataLoader(
                dataset,
                batch_size=bs,
                sampler=sampler,
                shuffle=is_train and sampler is None,
                drop_last=is_train,
                num_workers=workers,
                collate_fn=collate_fn,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=workers > 0 and not is_train,
                worker_init_fn=_ForkParitySeeding() if fork_parity_seeding else _seed_worker,
                generator=generator,
            )
        )
    return loaders
