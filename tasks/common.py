"""Loader construction shared by the tasks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset, DistributedSampler, Sampler

import utils
from data import create_loader
from data.samplers import ShardSampler

# Data keys every image task accepts (read by data.create_dataset and the transforms).
DATA_DEFAULTS: dict[str, Any] = {
    "image_root": "",
    "ann_root": "annotation",
    "image_size": 384,
    "batch_size_train": 32,
    "batch_size_test": 64,
    "hflip": True,
    "randaug": True,
    "crop_scale": [0.5, 1.0],
    "fork_parity_seeding": False,
}


def build_loaders(
    config: Mapping,
    dist: utils.DistInfo,
    train_set: Dataset,
    eval_sets: Mapping[str, Dataset],
    collate_fn: Callable | None = None,
    shard_eval: bool = True,
    eval_collate_fn: Callable | None = None,
    batch_sizes: tuple[int, int] | None = None,
    train_sampler: Sampler | None = None,
) -> tuple[Any, dict]:
    """Train loader over a DistributedSampler (also with one process: the data order then depends only
    on (seed, epoch), which exact resume relies on), or over ``train_sampler`` (one that shards by rank and
    has ``set_epoch``, e.g. DeiT's repeated augmentation); eval loaders sharded without padding, or the full
    split on every rank when ``shard_eval`` is False (retrieval). ``batch_sizes`` (train, eval) replaces
    the config's ``batch_size_train`` / ``batch_size_test``."""
    for split, ds in eval_sets.items():
        if len(ds) == 0:  # annotation files are checked when read; this catches datasets that filter entries
            raise ValueError(f"the {split} split is empty ({type(ds).__name__} with no samples)")
    world, rank = dist.world_size, dist.rank
    if train_sampler is None:
        train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=config["seed"])
    samplers: list = [train_sampler]
    samplers += [ShardSampler(ds, world, rank) if shard_eval else None for ds in eval_sets.values()]
    n = 1 + len(eval_sets)
    train_bs, eval_bs = batch_sizes or (config["batch_size_train"], config["batch_size_test"])
    loaders = create_loader(
        [train_set, *eval_sets.values()],
        samplers,
        batch_size=[train_bs] + [eval_bs] * (n - 1),
        num_workers=[config["num_workers"]] * n,
        is_trains=[True] + [False] * (n - 1),
        collate_fns=[collate_fn] + [eval_collate_fn] * (n - 1),
        seed=config["seed"],
        fork_parity_seeding=config["fork_parity_seeding"],
        rank=rank,
    )
    return loaders[0], dict(zip(eval_sets, loaders[1:]))


def blip_loader(task: str, reset_momentum: bool = False) -> Callable:
    """``load_pretrained`` for a BLIP task: official files (or same-layout ones) through the checkpoint policies."""

    def load(model, path: str, config: Mapping, evaluate: bool = False) -> None:
        from models.arch import fit_to_checkpoint, read_weights
        from models.checkpoints import load_blip_checkpoint

        # A compressed checkpoint first cuts the dense model to its widths (described, or inferred on request).
        extras: dict[str, Any] = {}
        sd, arch = read_weights(path, extras)
        if arch is None and ("space_dict" in sd or "temperature" in extras):  # the MADTP seed's files
            from models.madtp import from_release

            sd, arch = from_release(model, sd, extras, str(path))
        fit_to_checkpoint(model, sd, arch, str(path), infer=config.get("infer_arch", False))
        load_blip_checkpoint(model, sd, task, reset_momentum=reset_momentum, source=str(path), evaluate=evaluate)

    return load


def model_device(model) -> Any:
    return next(model.parameters()).device
